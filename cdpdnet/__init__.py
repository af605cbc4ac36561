"""CDPDNet: text-guided universal segmentation of 32 abdominal CT structures from partial labels.

Importable without MONAI Label. Entry points: :mod:`cdpdnet.taxonomy` (ROIs and datasets),
:func:`cdpdnet.factory.build_model` / :func:`~cdpdnet.factory.model_from_checkpoint`,
:class:`cdpdnet.training.Trainer`, :class:`cdpdnet.inference.Segmenter`, and ``python -m cdpdnet``.
"""

__version__ = "0.1.0"
