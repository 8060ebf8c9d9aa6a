"""Training skip transcoders, transcoders and cross-layer transcoders for any Gemma 3 model.

``train(make_config(kind=..., width=..., tokens=..., out=...))`` harvests activations from the model,
trains, and writes the native dictionary format (see :mod:`.trainer`). Modules: :mod:`.trainer_config`
(settings, checked before work starts), :mod:`.data` (text sources, packing, model samples),
:mod:`.harvest` (activations, shuffling blocks, disk cache), :mod:`.trainable` (parameters),
:mod:`.sparsity` and :mod:`.jumprelu_ste` (TopK, BatchTopK, JumpReLU), :mod:`.losses` (FVU, AuxK, L0,
matryoshka), :mod:`.step`, :mod:`.checkpoint`, :mod:`.distributed` (torchrun, gloo).
"""

from .losses import FvuSums, fvu
from .trainer import TrainResult, train
from .trainer_config import TrainerConfig, check_before_work, make_config

__all__ = ["FvuSums", "TrainResult", "TrainerConfig", "check_before_work", "fvu", "make_config", "train"]
