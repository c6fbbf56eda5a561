"""Image utility for machines (Khan et al., EUSIPCO 2022), for object detection.

Why: teams import frames from cameras and compressed streams, and some of them no detector can use.
This package says which, before anyone labels them:

* :mod:`~backend.utility.distortions` makes distorted copies (JPEG at several qualities; blur,
  noise and downscaling as options) whose utility is measured;
* :mod:`~backend.utility.labels` measures a detector's utility on a distorted copy against its
  pristine image and ground truth (binary, graded, clipped) and votes across detectors;
* :mod:`~backend.utility.baselines` holds the no-learning predictors a CNN must beat (JPEG quality
  read from the quantization tables, Laplacian variance, BRISQUE, a random filter);
* :mod:`~backend.utility.predictor` trains the CNN that predicts utility from decoded pixels alone
  and serves it through onnxruntime.
"""
