"""DuQuant fake quantization for the ``nn.Linear`` layers of any ``torch.nn.Module``.

DuQuant (Lin et al., NeurIPS 2024, "Distributing Outliers via Dual
Transformation") makes activations easy to quantize with an equivalent
transform per layer: smoothing, a greedy block rotation, a zigzag channel
permutation and a second rotation. Typical use::

    calib = quantize_(model, QuantConfig(mode="duquant", w_bits=4, a_bits=8), LayerSelection())
    for batch in calibration_batches:
        model(batch)
    report = calib.finish()
"""

from .api import quantize_
from .calibrate import Calibration
from .checkpoint import QuantizedCheckpointError, load_quantized, read_metadata, save_quantized
from .config import LayerBits, LayerOverride, QuantConfig
from .linear import DuQuantLinear
from .pack import CorruptPackError, PackStore
from .report import LayerReport, QuantReport
from .select import LayerSelection, select_layers
from .transform import Transform

__all__ = [
    "Calibration",
    "CorruptPackError",
    "DuQuantLinear",
    "LayerBits",
    "LayerOverride",
    "LayerReport",
    "LayerSelection",
    "PackStore",
    "QuantConfig",
    "QuantReport",
    "QuantizedCheckpointError",
    "Transform",
    "load_quantized",
    "quantize_",
    "read_metadata",
    "save_quantized",
    "select_layers",
]
