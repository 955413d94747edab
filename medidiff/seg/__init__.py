"""Segmentation with uncertainty (issue 16, items 5-8): torch and MONAI only.

- :mod:`medidiff.seg.config`: the typed config of a segmenter (architecture, patch, spacing, label table).
- :mod:`medidiff.seg.nets`: the conditional diffusion segmenter (MONAI ``DiffusionModelUNet`` over
  ``[image, noisy one-hot mask]``, predicting the clean mask, Diff-UNet style) and the MONAI ``DynUNet``
  baseline (the nnU-Net architecture).
- :mod:`medidiff.seg.diffusion`: its noise schedule, training loss and few-step DDIM sampler.
- :mod:`medidiff.seg.inference`: sliding-window prediction over a whole volume, K samples, and the
  summaries written by the segment stage (mean probabilities, labels, entropy, disagreement, volumes).
"""
