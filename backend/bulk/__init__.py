"""Bulk inference over a whole project: pre-annotation and feature extraction.

``work`` holds the picklable seams (what to run on which images), ``engine`` the in-process
engine (bounded concurrent fetches, batched inference), ``ray_engine`` the same contract on a
Ray cluster, and ``predict`` the resumable pre-annotation run that pushes to Label Studio.
"""
