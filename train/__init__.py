"""Training and evaluation of the SEM defect classifier (PyTorch): ``python -m train``, ``python -m train.evaluate``.

Modules: :mod:`train.models` (B0 / Lite0 and starting weights), :mod:`train.data` (class-folder datasets over the
runtime's preprocessing), :mod:`train.loop` (the resumable training run), :mod:`train.checkpoint`,
:mod:`train.confidence` (temperature and rejection threshold) and :mod:`train.evaluate` (metrics and plots).
"""
