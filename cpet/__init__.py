"""CPET: parameter-efficient tuning of compressed language models (the public API, re-exported)."""

__version__ = "0.1.0"

from ._quiet import silence_unactionable_warnings  # noqa: E402

silence_unactionable_warnings()  # before bitsandbytes or peft is first imported

from .compress import CompressedBase, compress  # noqa: E402
from .config import HeadMode, Importance, PruneConfig, QuantizeConfig, QuantMethod  # noqa: E402
from .models import load_base, tiny_model  # noqa: E402
from .pipeline import CPET, TaskAdapter  # noqa: E402
from .recovery import RecoveryConfig  # noqa: E402
from .train import DistillConfig, TuneConfig  # noqa: E402

__all__ = ["CPET", "TaskAdapter", "CompressedBase", "compress", "PruneConfig", "QuantizeConfig", "QuantMethod",
           "Importance", "HeadMode", "RecoveryConfig", "TuneConfig", "DistillConfig", "load_base", "tiny_model",
           "__version__"]
