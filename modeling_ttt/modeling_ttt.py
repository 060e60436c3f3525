"""Hugging Face model classes for TTT language models: glue around `layers.py`, no inner-loop math here."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple, logging

from .cache import TTTCache
from .compat import CACHE_NAME, cache_of, output_fields, resolve_cache
from .configuration_ttt import TTTConfig
from .layers import TTT_LAYER_CLASSES, RMSNorm, SwiGLUMLP, TTTConvBlock, TTTLayerBase
from .loss import is_plain_embedding, linear_cross_entropy, tied_embedding_and_head
from .ops import get_backend
from .packing import PACKING_KWARGS, DocumentLayout, batch_rows, document_layout

logger = logging.get_logger(__name__)


class TTTBlock(GradientCheckpointingLayer):
    """[pre-conv] → seq_norm → TTT layer → residual → ffn_norm → SwiGLU → residual."""

    def __init__(self, config: TTTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.pre_conv = config.pre_conv
        if self.pre_conv:
            self.conv = TTTConvBlock(config)
        self.seq_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.seq_modeling_block = TTT_LAYER_CLASSES[config.ttt_layer_type](config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config)

    def forward(self, hidden_states: torch.Tensor, num_tokens: torch.Tensor | None = None, layer_state=None,
                inner_loop=None, layout: DocumentLayout | None = None):
        """`layer_state` is this block's `TTTCacheLayer` (read, then overwritten with the new state), or None;
        `inner_loop` the backend's op for this forward, `layout` the packed documents, or None (see
        `TTTLayerBase.forward`)."""
        if self.pre_conv:
            hidden_states = hidden_states + self.conv(hidden_states, layer_state, num_tokens, layout)
        residual = hidden_states
        hidden_states = self.seq_modeling_block(self.seq_norm(hidden_states), layer_state, num_tokens, inner_loop,
                                                layout)
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.ffn_norm(hidden_states))


class TTTPreTrainedModel(PreTrainedModel):
    config_class = TTTConfig
    config: TTTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TTTBlock"]
    _is_stateful = True  # no rolling back of the state (see `_refuse_draft_decoding`)

    def save_pretrained(self, save_directory, *args, with_code: bool = True, **kwargs):
        """[`PreTrainedModel.save_pretrained`], and by default the modeling code with it: flat copies of this
        package's modules (the PyTorch ops, no kernels) and an `auto_map` in config.json, so that
        `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where `modeling_ttt` is not
        installed (`modeling_ttt.hub`). `with_code=False`: weights and config only. A failed save leaves no
        partial folder."""
        try:
            from .hub import save_pretrained_with_code
        except ImportError:  # this is the remote-code copy (no hub module): transformers' own save copies it
            return super().save_pretrained(save_directory, *args, **kwargs)
        return save_pretrained_with_code(self, super().save_pretrained, save_directory, *args, with_code=with_code,
                                         **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_missing_ttt_weights: bool = False,
                        allow_unexpected_ttt_weights: bool = False, **kwargs):
        r"""
        [`PreTrainedModel.from_pretrained`], refusing a checkpoint that does not fit the model its config describes.

        transformers initialises a weight missing from the checkpoint at random and drops a tensor the model has no
        place for, and only logs a report. For a TTT model that is a different model without a sign (`use_gate`
        true in config.json for a checkpoint without `g_proj` gives random gates), so here either is a `ValueError`
        naming the keys, unless allowed:

        allow_missing_ttt_weights (`bool`, *optional*, defaults to `False`):
            Load even if weights are missing from the checkpoint; they are initialised at random (e.g. to train them).
        allow_unexpected_ttt_weights (`bool`, *optional*, defaults to `False`):
            Load even if the checkpoint holds tensors the model does not use; they are ignored.

        Tied weights (`lm_head.weight` with `tie_word_embeddings`) and the non-persistent buffers (`token_idx`,
        `rope_rotation`, computed from the config) are never missing. A size mismatch stays transformers' error,
        which `ignore_mismatched_sizes=True` turns into a random initialisation. `output_loading_info=True` returns
        the report (`missing_keys`, `unexpected_keys`, ...) with the model, as usual.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        problems, switches = [], []
        if loading_info["missing_keys"] and not allow_missing_ttt_weights:
            problems.append("Missing from the checkpoint (the model would initialise them at random): "
                            f"{_key_list(loading_info['missing_keys'])}.")
            switches.append("`allow_missing_ttt_weights=True` (random weights)")
        if loading_info["unexpected_keys"] and not allow_unexpected_ttt_weights:
            problems.append("In the checkpoint but not used by the model (they would be ignored): "
                            f"{_key_list(loading_info['unexpected_keys'])}.")
            switches.append("`allow_unexpected_ttt_weights=True` (tensors ignored)")
        if problems:
            raise ValueError(
                f"{cls.__name__}.from_pretrained({str(pretrained_model_name_or_path)!r}): the checkpoint does not fit "
                f"the model its config describes. {' '.join(problems)} Check that the config matches the checkpoint "
                "(pre_conv, share_qk, use_gate, ttt_layer_type, tie_word_embeddings, num_hidden_layers), or pass "
                f"{' and '.join(switches)} to load it anyway."
            )
        if output_loading_info:
            return model, loading_info
        return model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # A DynamicCache would be reordered by beam search instead of our state: we build TTTCache ourselves.
        return False

    def push_to_hub(self, repo_id: str, **kwargs):
        r"""
        [`PushToHubMixin.push_to_hub`] with the TTT model card: the saved folder (weights, config, generation config,
        `tokenizer=` if given) and a README.md rendered by [`modeling_ttt.model_card.make_model_card`] go up in one
        commit. Card arguments (`training=`, `results=`, `plot=`, `base_model=`, `license=`, ...) or a ready
        `model_card=` may be passed along; see [`modeling_ttt.model_card.push_model_to_hub`].
        """
        from .model_card import push_model_to_hub

        return push_model_to_hub(self, repo_id, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        """Initialisation of the official JAX code: normal(initializer_range) for projections, embeddings, inner
        weights and lr gates; zeros for biases and the learnable token scale; flax's lecun-normal for convs."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, nn.Conv1d):
            init.lecun_normal_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, TTTLayerBase):
            for name in module.inner_weight_names:
                param = getattr(module, name)
                if name.startswith("W"):
                    init.normal_(param, mean=0.0, std=std)
                else:
                    init.zeros_(param)
            init.normal_(module.learnable_ttt_lr_weight, mean=0.0, std=std)
            init.zeros_(module.learnable_ttt_lr_bias)
            init.zeros_(module.learnable_token_idx)
            init.ones_(module.ttt_norm_weight)
            init.zeros_(module.ttt_norm_bias)
            for name, value in module.compute_buffers().items():
                init.copy_(getattr(module, name), value)


class TTTModel(TTTPreTrainedModel):
    # The base model loads from a `TTTForCausalLM` checkpoint without its head (as `AutoModel` does).
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.weight$"]

    def __init__(self, config: TTTConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([TTTBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TTTCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: TTTCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for real tokens, 0 for padding (left, right, or anywhere). Padding never changes the state: each row
            is processed as if its padding were absent; hidden states at padded positions are zero.
        position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)` or `(sequence_length,)`, *optional*):
            Either one sequence per row, or packed documents.

            - One sequence per row (no id is 0 after a row's first real token): accepted for compatibility and
              checked. A TTT layer's RoPE position is the token's index inside its inner mini-batch, which follows
              from the cache's token counter, so these must agree with it (modulo `mini_batch_size`) at real tokens,
              or a `ValueError` is raised.
            - Packed documents (the convention of `DataCollatorWithFlattening`): an id of 0 after a row's first real
              token starts a new document. Every document is then processed as if it were alone: the TTT layers
              restart from their learned initial inner weights (no pending gradient sum, mini-batches and RoPE
              positions aligned to the document's first token) and the causal convs read nothing of the previous
              document. Each row's first id must be 0 and every later id the previous plus one or 0, else a
              `ValueError`. Documents may also be given by the collator's `seq_idx` or `cu_seq_lens_q` /
              `cu_seq_lens_k` (with `max_length_q` / `max_length_k`) keyword arguments; where several are given they
              must describe the same documents. With padding (`attention_mask`), the documents are those of the
              real tokens. A packed input cannot continue a cache that has read tokens (`ValueError`); with
              `use_cache`, the returned cache continues each row's *last* document (its `seen_tokens()` is that
              document's length), exactly as if that document had been fed alone.
        cache (`TTTCache`, *optional*):
            Recurrent state to continue from; updated in place and returned when `use_cache` (as `output.cache`
            on transformers >= 5.24, `output.past_key_values` before).
        past_key_values (`TTTCache`, *optional*):
            The older name of `cache`, accepted on every release (passing both, as different objects, raises).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        cache = resolve_cache(cache, past_key_values)
        from_generate = kwargs.get("from_generate", False)
        _check_inputs(input_ids, inputs_embeds, from_generate)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq_len = inputs_embeds.shape[:2]

        if cache is not None and not isinstance(cache, TTTCache):
            raise ValueError(
                f"cache must be a TTTCache (the recurrent state of a TTT model), got {type(cache).__name__}."
            )
        if self.training and use_cache and self.is_activation_checkpointing:  # (the property walks all modules)
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing; using use_cache=False.")
            use_cache = False
        if use_cache and cache is None:
            cache = TTTCache(self.config)
        if cache is not None:
            cache.check_compatible(self.config, batch)
            seen = cache.seen_tokens()
        else:
            seen = None

        # Padding: move each row's real tokens to the front (right padding), run, and move them back.
        attention_mask = _current_mask(attention_mask, seen, batch, seq_len, from_generate)
        order, num_tokens = _compaction(attention_mask, batch, seq_len, inputs_embeds.device)
        # Packed documents (position ids restarting at 0, or the other kwargs of DataCollatorWithFlattening)
        packing_kwargs = {name: kwargs[name] for name in PACKING_KWARGS if kwargs.get(name) is not None}
        layout = document_layout(position_ids, packing_kwargs, order, num_tokens, batch, seq_len,
                                 inputs_embeds.device)
        if layout is not None and seen is not None:
            raise ValueError(
                "The input holds packed documents (position_ids restarting at 0 inside a row, seq_idx or "
                "cu_seq_lens), and a cache that has already read tokens was passed: a packed forward starts every "
                "document from the initial state, so it cannot continue a cache. Pass no cache (with use_cache=True "
                "the returned cache continues each row's last document), or feed the continuation as an unpacked "
                "row with position_ids that continue the cache's count."
            )
        if position_ids is not None and layout is None:
            _check_position_ids(position_ids, attention_mask, seen, batch, seq_len, self.config.mini_batch_size,
                                from_generate)
        hidden_states = inputs_embeds if order is None else _gather_rows(inputs_embeds, order, num_tokens)

        # The backend (inner-loop op, and maybe a one-call step through all blocks) is decided once per forward.
        backend = get_backend(self.config.ttt_impl, self.config.ttt_layer_type, hidden_states.device,
                              self.config.head_dim)
        stepped = None
        if (backend.model_step is not None and seq_len == 1 and order is None and not output_hidden_states
                and cache is not None):
            stepped = backend.model_step(self, hidden_states, cache)  # None where it cannot run
        all_hidden_states = () if output_hidden_states else None
        if stepped is not None:
            hidden_states = stepped
        for i, block in enumerate(self.layers if stepped is None else ()):
            if output_hidden_states:
                all_hidden_states += (_scatter_rows(hidden_states, order, num_tokens),)
            layer_state = cache.layers[i] if cache is not None else None
            hidden_states = block(hidden_states, num_tokens=num_tokens, layer_state=layer_state,
                                  inner_loop=backend.inner_loop, layout=layout)

        hidden_states = _scatter_rows(self.norm(hidden_states), order, num_tokens)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None:
            cache.advance(batch, seq_len)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **output_fields(cache if use_cache else None),
        )


DRAFT_DECODING_ERROR = (
    "TTT models cannot use assisted, prompt-lookup or early-exit decoding: those modes roll the cache back over "
    "rejected draft tokens, and a TTT state is a model updated by every token, with no earlier state kept."
)


def _refuse_draft_decoding(generation_config, kwargs: dict, default_config) -> None:
    """Speculative modes verify draft tokens and roll the cache back over the rejected ones. transformers up to
    5.24 refused them for `_is_stateful` models; 5.25 instead records recurrent states to roll back to, which a
    TTT cache does not keep. Refused here, before any compute, on every release."""
    config = generation_config or default_config
    asked = [
        name for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
        if kwargs.get(name) is not None or getattr(config, name, None) is not None
    ]
    if asked:
        raise ValueError(f"{DRAFT_DECODING_ERROR} (asked for: {', '.join(asked)})")


class TTTForCausalLM(TTTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TTTConfig):
        super().__init__(config)
        self.model = TTTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def _embedding_is_tied_plain(self) -> bool:
        """The head's weight is the input embedding's, under autograd, and the embedding is a plain module
        ([`modeling_ttt.loss.is_plain_embedding`]): then the fused loss takes both from [`tied_embedding_and_head`]."""
        embedding = self.model.embed_tokens
        return (torch.is_grad_enabled() and embedding.weight is self.lm_head.weight
                and embedding.weight.requires_grad and is_plain_embedding(embedding))

    def stream(self, input_ids, **kwargs):
        """Score a long token sequence chunk by chunk with the recurrent cache: exact (equal to one full forward),
        memory flat in the sequence length, with a progress bar. Returns a `StreamScore` (per-token NLLs, total
        NLL, perplexity, token count, optional loss per position bucket); keyword arguments and conventions are
        those of [`modeling_ttt.streaming.score_stream`]."""
        from .streaming import score_stream

        return score_stream(self, input_ids, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        """generate(): build an empty TTTCache (filled for the expanded batch at the first forward) unless the
        caller passed one to continue from."""
        # a cache passed to generate() under either name is kept under the installed release's name
        user_cache = resolve_cache(model_kwargs.pop("cache", None), model_kwargs.pop("past_key_values", None))
        if user_cache is not None:
            model_kwargs[CACHE_NAME] = user_cache
            if not isinstance(user_cache, TTTCache):
                raise ValueError(f"{CACHE_NAME} must be a TTTCache, got {type(user_cache).__name__}.")
            user_cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        model_kwargs[CACHE_NAME] = TTTCache(self.config)

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """[`GenerationMixin.generate`], after checking the prompt: `[batch, seq_len]` integer token ids with at
        least one token (generate itself fails on other shapes with errors that do not say what was wrong)."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(prompt, torch.Tensor):
            _check_inputs(prompt, None, from_generate=True)
        _refuse_draft_decoding(args[0] if args else kwargs.get("generation_config"), kwargs, self.generation_config)
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """generate()'s own preparation, marked as coming from generate so that a position-ids or mask mismatch
        is reported as what it is there (a cache that did not see the prompt), not as a bad argument."""
        # generate() slices the input to what the cache has not read: nothing left means `[-0:]` (everything again,
        # transformers >= 5.24) or an empty `cache_position` (before)
        cache_position = kwargs.get("cache_position")
        if kwargs.get("next_sequence_length") == 0 or (cache_position is not None and cache_position.numel() == 0):
            cache = resolve_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
            raise ValueError(
                f"The cache given to generate() has already read {cache.get_seq_length()} positions, as many as the "
                f"input has ({input_ids.shape[1]}): generate() needs at least the newest token unread (its logits "
                "give the first new token). Pass the cache from before the prompt's last token, or the prompt plus "
                "the tokens to read next."
            )
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        model_inputs["from_generate"] = True
        return model_inputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TTTCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: TTTCache | None = None,
        return_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels (shifted inside the loss); -100 is ignored. `num_items_in_batch` and `shift_labels`
            (keyword arguments) act as in transformers' `ForCausalLMLoss`.
        return_logits (`bool`, *optional*):
            Whether `outputs.logits` is computed when `labels` are given. By default (`None`) it is not in training
            mode (`model.train()`): the loss is then computed by [`modeling_ttt.loss.linear_cross_entropy`], the LM
            head fused with the cross-entropy chunk by chunk, which never holds the `[batch, seq_len, vocab_size]`
            logits (same value and gradients as the usual loss), and `outputs.logits` is `None`. In eval mode
            (`model.eval()`, as `Trainer.evaluate` sets) the logits are returned as usual. `True` forces the
            logits (and the usual loss from them); `False` forces the fused loss.
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            Compute logits for the last `logits_to_keep` positions only (0: all), or for the given indices.
        cache, past_key_values: see [`TTTModel.forward`] (one argument under its new and its old name).
        kwargs: `DataCollatorWithFlattening`'s `seq_idx`, `cu_seq_lens_q`/`cu_seq_lens_k`, `max_length_q`/`max_length_k`
            go to the model (packed documents, see [`TTTModel.forward`]); the others to the loss function.
        """
        if return_logits is None:
            return_logits = not self.training
        fused_loss = (labels is not None and not return_logits and isinstance(logits_to_keep, int)
                      and logits_to_keep == 0 and self.loss_function is LOSS_MAPPING["ForCausalLM"]
                      and type(self.lm_head) is nn.Linear and self.lm_head.bias is None)
        # (a wrapped head — an adapter on it, a quantized layer — is not just its weight: the usual path then)
        from_generate = kwargs.pop("from_generate", False)
        head_weight = self.lm_head.weight if fused_loss else None
        if fused_loss and inputs_embeds is None and self._embedding_is_tied_plain():
            _check_inputs(input_ids, inputs_embeds, from_generate)
            inputs_embeds, head_weight = tied_embedding_and_head(self.model.embed_tokens, input_ids)
            input_ids = None
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            from_generate=from_generate,
            **{name: kwargs.pop(name) for name in PACKING_KWARGS if name in kwargs},  # the model's, not the loss's
        )
        if fused_loss:
            logits = None
            loss = linear_cross_entropy(outputs.last_hidden_state, head_weight, labels, **kwargs)
        else:
            hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
            logits = self.lm_head(hidden_states)
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **output_fields(cache_of(outputs)),
        )


# ----------------------------------------------------------------------------------------------------------------
# Loading helpers
# ----------------------------------------------------------------------------------------------------------------


def _key_list(keys) -> str:
    """Checkpoint keys for an error message, sorted, each name that recurs in several layers written once with the
    layer numbers: `model.layers.{0-11}.seq_modeling_block.g_proj.weight`."""
    layers_of: dict[tuple[str, str], list[int]] = {}
    for key in keys:
        match = re.fullmatch(r"(.*\blayers\.)(\d+)(\..+)", key)
        if match is None:
            layers_of[(key, "")] = []
        else:
            layers_of.setdefault((match[1], match[3]), []).append(int(match[2]))
    names = []
    for (start, end), layers in sorted(layers_of.items()):
        if not layers:
            names.append(start)
        elif len(layers) == 1:
            names.append(f"{start}{layers[0]}{end}")
        else:
            names.append(f"{start}{{{_number_ranges(sorted(layers))}}}{end}")
    return ", ".join(names)


def _number_ranges(numbers: list[int]) -> str:
    """`[0, 1, 2, 3, 5, 6]` -> `"0-3, 5, 6"`."""
    runs = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    parts = []
    for first, last in runs:
        parts += [f"{first}-{last}"] if last - first >= 2 else [str(n) for n in range(first, last + 1)]
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Padding helpers
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(input_ids, inputs_embeds, from_generate: bool) -> None:
    """Exactly one of `input_ids` (`[B, T]` integer ids) and `inputs_embeds` (`[B, T, C]` floats), `T >= 1`."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
    if input_ids is not None:
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype} (ids would be "
                             "truncated); convert with `.long()` if the values are whole numbers.")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids {'given to generate() ' if from_generate else ''}must be 2-D (batch, "
                             f"seq_len), got shape {tuple(input_ids.shape)}"
                             + (": add the batch axis with `input_ids.unsqueeze(0)`." if input_ids.dim() == 1 else "."))
        tokens = input_ids.shape[1]
    else:
        if inputs_embeds.dim() != 3 or not inputs_embeds.dtype.is_floating_point:
            raise ValueError(f"inputs_embeds must be a 3-D float tensor (batch, seq_len, hidden_size), got shape "
                             f"{tuple(inputs_embeds.shape)} and dtype {inputs_embeds.dtype}.")
        tokens = inputs_embeds.shape[1]
    if tokens == 0:
        raise ValueError("The input holds no tokens (seq_len 0)" + (
            ": generate() needs a prompt of at least one token (e.g. the BOS token) that the cache has not read."
            if from_generate else "."))


def _current_mask(attention_mask, seen, batch, seq_len, from_generate: bool = False):
    """generate() passes the mask of the whole sequence so far, `(B, past + T)`: keep the last `T` columns,
    after checking that the past columns agree with what the cache has seen."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[-1] <= seq_len:
        return attention_mask
    if attention_mask.shape[0] != batch:
        return attention_mask  # _compaction reports the shape error
    past = attention_mask[:, :-seq_len]
    seen_by_mask = (past != 0).sum(dim=1)
    expected = seen if seen is not None else torch.zeros_like(seen_by_mask)
    if not torch.equal(seen_by_mask.to(expected.device), expected):
        covers = (f"{attention_mask.shape[-1]} columns for {seq_len} new tokens, so it covers "
                  f"{attention_mask.shape[-1] - seq_len} past positions holding {seen_by_mask.tolist()} real tokens "
                  f"per row, but the cache has seen {expected.tolist()} tokens per row")
        if from_generate:
            raise ValueError(
                f"generate() passed the attention mask of the whole sequence so far: {covers}. The cache given to "
                "generate() is not the one that saw the beginning of these inputs: continue with the cache returned "
                "for exactly that prefix, or pass no cache and the whole text."
            )
        raise ValueError(
            f"The attention_mask you passed has {covers}. Pass a mask of shape (batch, {seq_len}) or one that covers "
            "exactly the tokens the cache has seen."
        )
    return attention_mask[:, -seq_len:]


def _compaction(attention_mask, batch, seq_len, device):
    """From a `[B, T]` 0/1 mask, the per-row order that puts real tokens first, and the real-token counts.
    Returns `(None, None)` when there is no padding."""
    if attention_mask is None:
        return None, None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seq_len):
        raise ValueError(
            f"attention_mask must be a 2D 0/1 mask of shape (batch, seq_len) = {(batch, seq_len)}, got "
            f"{tuple(attention_mask.shape)}."
        )
    mask = attention_mask.to(device=device)
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token).")
        mask = mask.bool()
    if bool(mask.all()):
        return None, None
    # Stable sort on "is padding" keeps real tokens in order at the front.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return order, mask.sum(dim=1)


def _gather_rows(x: torch.Tensor, order: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Each row's real tokens first, in order; the padded slots after them hold zeros (whatever the padding's
    embeddings were, NaN included: they must not enter any product)."""
    x = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    real = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < num_tokens.unsqueeze(1)
    return x.masked_fill(~real.unsqueeze(-1), 0.0)


def _scatter_rows(x: torch.Tensor, order: torch.Tensor | None, num_tokens: torch.Tensor | None) -> torch.Tensor:
    """Inverse of `_gather_rows`; padded positions get zeros."""
    if order is None:
        return x
    real = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < num_tokens.unsqueeze(1)
    x = x.masked_fill(~real.unsqueeze(-1), 0.0)
    return torch.zeros_like(x).scatter(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)


def _check_position_ids(position_ids, attention_mask, seen, batch, seq_len, mini_batch_size, from_generate=False):
    position_ids = batch_rows(position_ids, "position_ids", batch, seq_len)
    device = position_ids.device
    start = seen.to(device) if seen is not None else torch.zeros(batch, dtype=torch.long, device=device)
    if attention_mask is None:
        expected = start.unsqueeze(1) + torch.arange(seq_len, device=device)
        real = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    else:
        real = attention_mask.to(device).bool()
        expected = start.unsqueeze(1) + real.long().cumsum(1) - 1
    mismatch = ((position_ids - expected) % mini_batch_size != 0) & real
    if bool(mismatch.any()):
        row, col = (int(v) for v in mismatch.nonzero()[0])
        where = (f"row {row}, position {col} has position id {int(position_ids.expand(batch, -1)[row, col])}, but "
                 f"the cache has seen {int(start[row])} tokens of that row, so it is token {int(expected[row, col])}"
                 f" of its sequence (TTT compares positions mod mini_batch_size = {mini_batch_size})")
        if from_generate:
            raise ValueError(
                f"generate() counted more (or fewer) tokens before these than the cache has seen: {where}. generate() "
                "builds position_ids from the whole input and its attention mask, so the cache given to generate() "
                "is not the one that saw the beginning of the input: continue with the cache returned for exactly "
                "that prefix, or pass no cache and the whole text."
            )
        raise ValueError(
            f"The position_ids you passed disagree with the tokens this model has seen: {where}. Pass position_ids "
            "that continue the cache's count (or none: a TTT model takes positions from its cache)."
        )


__all__ = ["TTTPreTrainedModel", "TTTModel", "TTTForCausalLM", "TTTBlock"]
