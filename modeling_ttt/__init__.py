"""modeling-ttt: TTT (Test-Time Training) language models for Hugging Face transformers.

Importing the package registers model_type "ttt" with AutoConfig, AutoModel and AutoModelForCausalLM.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import TTTCache
from .configuration_ttt import PRESET_NAMES, TTTConfig
from .modeling_ttt import TTTForCausalLM, TTTModel, TTTPreTrainedModel
from .streaming import StreamScore, score_stream

AutoConfig.register("ttt", TTTConfig, exist_ok=True)
AutoModel.register(TTTConfig, TTTModel, exist_ok=True)
AutoModelForCausalLM.register(TTTConfig, TTTForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = ["TTTConfig", "TTTModel", "TTTForCausalLM", "TTTPreTrainedModel", "TTTCache", "PRESET_NAMES",
           "StreamScore", "score_stream"]
