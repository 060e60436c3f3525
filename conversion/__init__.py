"""Checkpoint converters for TTT language models.

`modeling_ttt.conversion.jax` converts between checkpoints of the official JAX code (test-time-training/ttt-lm-jax) and
Hugging Face folders of `modeling_ttt`; it is also the home of the `ttt-convert-jax` and `ttt-convert-to-jax`
console scripts. The msgpack reader/writer and the config mapping need neither torch nor jax. `modeling_ttt.conversion.outputs`
writes a run's outputs together or not at all, for both.
"""

from .jax_config import ConfigConversionError, hf_config_to_jax_config, jax_config_to_hf_kwargs, load_jax_config
from .jax_params import ParameterMappingError, ParameterSpec, Transform, jax_parameter_shapes, parameter_specs
from .msgpack_checkpoint import (
    CheckpointFormatError,
    CheckpointParams,
    read_checkpoint_params,
    read_streaming_checkpoint,
    write_streaming_checkpoint,
    write_streaming_records,
)
from .outputs import Output, OutputError, check_output, remove_stale_temporaries, write_outputs

__all__ = [
    "CheckpointFormatError",
    "CheckpointParams",
    "ConfigConversionError",
    "Output",
    "OutputError",
    "ParameterMappingError",
    "ParameterSpec",
    "Transform",
    "check_output",
    "hf_config_to_jax_config",
    "jax_config_to_hf_kwargs",
    "jax_parameter_shapes",
    "load_jax_config",
    "parameter_specs",
    "read_checkpoint_params",
    "read_streaming_checkpoint",
    "remove_stale_temporaries",
    "write_outputs",
    "write_streaming_checkpoint",
    "write_streaming_records",
]
