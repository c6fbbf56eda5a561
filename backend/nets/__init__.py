"""Pretrained network bodies shared by the detectors and the feature extractors."""
