"""Handwritten digit recognition for the boxes of Remontée's paper forms.

This package owns reading one digit per comb-field box, from digital-pen
strokes rendered to pixels or from scans: ``recognizer`` (run-time API, numpy +
OpenCV), ``preprocess`` (the crop -> model-input function shared by training
and run time), ``strokes`` (rendering pen strokes), ``trajectory`` (reading a
pen digit from its strokes in writing order, combined with the picture for ink
boxes), ``skeleton`` (strokes traced from a scanned digit's picture, read by the
same kind of network for scans), ``reliability`` (what a channel's confidences are
worth on whole forms), ``synth``/``data``/``evaluation`` (training, calibration and
held-out data), ``train`` / ``train_trajectory`` / ``train_traced`` (PyTorch,
training time only), ``fit_reliability`` (fitting time only) and ``form_boxes`` (the boxes the
pipeline cuts from whole forms, which the fits and the fine-tuning read).
Data sources and licences: ``ATTRIBUTION.md``.
"""

from .recognizer import RECOMMENDED_THRESHOLD, DigitReading, DigitRecognizer
from .strokes import render_strokes

__all__ = ["RECOMMENDED_THRESHOLD", "DigitReading", "DigitRecognizer", "render_strokes"]
