"""Model cards for TTT models, and `push_to_hub` that uploads the saved folder with its card in one commit.

The card is rendered from the Jinja template `model_cards/ttt_model_card.md` (installed as
`modeling_ttt/model_cards/`) with `huggingface_hub.ModelCard.from_template`: the architecture comes from the config,
the training data and evaluation results from what the caller passes.

    card = make_model_card(config, num_parameters=model.num_parameters(),
                           training={"datasets": ["DKYoon/SlimPajama-6B"], "tokens": 2_500_000_000},
                           results=[{"dataset": "DKYoon/SlimPajama-6B", "split": "test", "perplexity": 11.2}])
    write_model_card(model, "out/", results=...)   # writes out/README.md
    model.push_to_hub("me/ttt-125m", tokenizer=tokenizer, results=...)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import CommitInfo, EvalResult, ModelCard, ModelCardData

from .configuration_ttt import TTTConfig

TEMPLATE_NAME = "ttt_model_card.md"
PAPER_URL = "https://arxiv.org/abs/2407.04620"
BASE_TAGS = ("ttt", "test-time-training", "text-generation")

# What `training=` and each entry of `results=` may hold; anything else is a ValueError (a typo would otherwise
# silently leave a field out of the card).
TRAINING_KEYS = {
    "datasets": "Hub ids or names of the training data sets (a string or a list)",
    "tokens": "number of training tokens (an int)",
    "steps": "number of optimizer steps (an int)",
    "sequence_length": "training sequence length, when it differs from config.max_position_embeddings",
    "notes": "free text shown under Training",
}
RESULT_KEYS = {
    "perplexity": "the perplexity (required)",
    "dataset": "Hub id (or name) of the evaluation data set (required)",
    "dataset_name": "display name of the data set (defaults to `dataset`)",
    "config": "data set configuration",
    "split": "data set split, e.g. 'test'",
    "context_length": "evaluation context length in tokens",
}


def template_dir() -> str:
    """Folder holding the card template: its copy inside the installed package, or `model_cards/` of the source tree."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "model_cards"), os.path.join(os.path.dirname(here), "model_cards")):
        if os.path.isfile(os.path.join(candidate, TEMPLATE_NAME)):
            return candidate
    raise FileNotFoundError(f"TTT model card template {TEMPLATE_NAME} not found "
                            "(expected `model_cards/` next to `modeling_ttt/`).")


def template_path() -> str:
    return os.path.join(template_dir(), TEMPLATE_NAME)


# ----------------------------------------------------------------------------------------------------------------
# What the card says about the architecture
# ----------------------------------------------------------------------------------------------------------------


def backbone_name(config: TTTConfig) -> str:
    """"Mamba" (pre_conv, share_qk and use_gate all on), "Transformer" (all off), or "custom" for a mix."""
    flags = (config.pre_conv, config.share_qk, config.use_gate)
    if all(flags):
        return "Mamba"
    if not any(flags):
        return "Transformer"
    return "custom"


def layer_name(config: TTTConfig) -> str:
    return {"linear": "TTT-Linear", "mlp": "TTT-MLP"}[config.ttt_layer_type]


def human_size(count: int) -> str:
    """125_000_000 -> "125M", 1_300_000_000 -> "1.3B", 12_345 -> "12.3K"."""
    for factor, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= factor:
            value = count / factor
            text = f"{value:.1f}" if value < 100 else f"{value:.0f}"
            return text.removesuffix(".0") + suffix
    return str(count)


def default_model_name(config: TTTConfig, num_parameters: int) -> str:
    return f"{layer_name(config)} {human_size(num_parameters)} ({backbone_name(config)} backbone)"


# ----------------------------------------------------------------------------------------------------------------
# Checking what the caller passed
# ----------------------------------------------------------------------------------------------------------------


def _check_keys(given: Mapping, allowed: Mapping, what: str) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        listing = "; ".join(f"{key}: {meaning}" for key, meaning in allowed.items())
        raise ValueError(f"Unknown {what} key(s) {unknown}; allowed: {listing}.")


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def normalize_training(training: Mapping[str, Any] | None) -> dict[str, Any]:
    if training is None:
        return {}
    if not isinstance(training, Mapping):
        raise TypeError(f"training must be a mapping, got {type(training).__name__}.")
    _check_keys(training, TRAINING_KEYS, "training")
    normalized = dict(training)
    normalized["datasets"] = _as_list(training.get("datasets"))
    for key in ("tokens", "steps", "sequence_length"):
        value = training.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"training[{key!r}] must be a positive int, got {value!r}.")
    return normalized


def normalize_results(results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """One evaluation result (a mapping) or several (a sequence of mappings), each checked and completed."""
    if results is None:
        return []
    entries = [results] if isinstance(results, Mapping) else list(results)
    normalized = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise TypeError(f"results[{index}] must be a mapping, got {type(entry).__name__}.")
        _check_keys(entry, RESULT_KEYS, f"results[{index}]")
        for required in ("perplexity", "dataset"):
            if required not in entry:
                raise ValueError(f"results[{index}] needs {required!r} ({RESULT_KEYS[required]}).")
        perplexity = entry["perplexity"]
        if isinstance(perplexity, bool) or not isinstance(perplexity, (int, float)) or not perplexity >= 1:
            raise ValueError(f"results[{index}]['perplexity'] must be a number >= 1, got {perplexity!r}.")
        result = dict(entry)
        result["perplexity"] = float(perplexity)
        result.setdefault("dataset_name", entry["dataset"])
        result.setdefault("split", None)
        result.setdefault("config", None)
        result.setdefault("context_length", None)
        result["perplexity_text"] = f"{float(perplexity):.2f}"
        normalized.append(result)
    return normalized


def eval_results(results: list[dict[str, Any]]) -> list[EvalResult]:
    """The `model-index` entries: one perplexity per evaluated data set."""
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Language modelling",
            dataset_type=result["dataset"],
            dataset_name=result["dataset_name"],
            dataset_config=result["config"],
            dataset_split=result["split"],
            metric_type="perplexity",
            metric_name="Perplexity",
            metric_value=result["perplexity"],
            metric_config=None if result["context_length"] is None else f"context_length={result['context_length']}",
        )
        for result in results
    ]


# ----------------------------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------------------------

PARITY_KEYS = {
    "max_abs_logit_diff": "largest |converted - reference| over all logits (required)",
    "argmax_agreement": "fraction of positions where both pick the same greedy token, 0..1 (required)",
    "num_tokens": "number of positions compared (an int)",
    "reference": "what the reference logits come from (free text)",
}


def normalize_parity(parity: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if parity is None:
        return None
    _check_keys(parity, PARITY_KEYS, "parity")
    for key in ("max_abs_logit_diff", "argmax_agreement"):
        value = parity.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"parity[{key!r}] must be a number, got {value!r}.")
    if not 0.0 <= parity["argmax_agreement"] <= 1.0:
        raise ValueError(f"parity['argmax_agreement'] must be in [0, 1], got {parity['argmax_agreement']!r}.")
    normalized = dict(parity)
    normalized["max_abs_text"] = f"{float(parity['max_abs_logit_diff']):.3e}"
    normalized["agreement_text"] = f"{100.0 * float(parity['argmax_agreement']):.2f}%"
    return normalized


def make_model_card(
    config: TTTConfig,
    *,
    num_parameters: int,
    base_model: str | None = None,
    training: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    plot: str | None = None,
    license: str = "apache-2.0",
    repo_id: str | None = None,
    model_name: str | None = None,
    language: str | list[str] | None = "en",
    tags: Sequence[str] | None = None,
    parity: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Render the TTT model card for `config`.

    Args:
        config: the model's `TTTConfig` (architecture, size, mini-batch size, context length).
        num_parameters: the model's parameter count (`model.num_parameters()`).
        base_model: Hub id of the model this one was converted or fine-tuned from (metadata `base_model`).
        training: training metadata, keys in `TRAINING_KEYS` (data sets, tokens, ...).
        results: one or several evaluation results, keys in `RESULT_KEYS`; they become the `model-index`.
        plot: file name, inside the repository, of a loss-by-position plot to embed.
        license: Hub license identifier.
        repo_id: the repository the card is for, used in the loading instructions.
        model_name: title of the card and name of the `model-index` entry.
        language: metadata `language`.
        tags: extra tags, after "ttt", "test-time-training", "text-generation" and the layer/backbone tags.
        parity: how well a converted model reproduces its source, keys in `PARITY_KEYS` (a "Conversion parity"
            section; `ttt-convert-jax --reference` fills it).
    """
    if not isinstance(config, TTTConfig):
        raise TypeError(f"config must be a TTTConfig, got {type(config).__name__}.")
    if isinstance(num_parameters, bool) or not isinstance(num_parameters, int) or num_parameters <= 0:
        raise ValueError(f"num_parameters must be a positive int, got {num_parameters!r}.")
    training = normalize_training(training)
    results = normalize_results(results)
    parity = normalize_parity(parity)
    model_name = model_name or default_model_name(config, num_parameters)
    repo_id = repo_id or "<repo_id>"

    all_tags = list(BASE_TAGS) + [layer_name(config).lower(), f"{backbone_name(config).lower()}-backbone"]
    for tag in tags or ():
        if tag not in all_tags:
            all_tags.append(tag)

    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        language=language,
        tags=all_tags,
        base_model=base_model,
        datasets=training.get("datasets") or None,
        metrics=["perplexity"] if results else None,
        eval_results=eval_results(results) or None,
    )
    flags = f"pre_conv={config.pre_conv}, share_qk={config.share_qk}, use_gate={config.use_gate}"
    return ModelCard.from_template(
        card_data,
        template_path=template_path(),
        repo_id=repo_id,
        model_name=model_name,
        size=human_size(num_parameters),
        num_parameters_text=f"{num_parameters:,}",
        layer_name=layer_name(config),
        backbone=backbone_name(config),
        backbone_flags=flags,
        ttt_layer_type=config.ttt_layer_type,
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        mini_batch_size=config.mini_batch_size,
        context_length=config.max_position_embeddings,
        vocab_size=config.vocab_size,
        training_datasets=training.get("datasets"),
        training_tokens=None if training.get("tokens") is None else f"{training['tokens']:,}",
        training_steps=None if training.get("steps") is None else f"{training['steps']:,}",
        training_sequence_length=training.get("sequence_length"),
        training_notes=training.get("notes"),
        results=results,
        parity=parity,
        plot=plot,
        paper_url=PAPER_URL,
    )


def write_model_card(model_or_config, directory: str | os.PathLike, **kwargs) -> ModelCard:
    """Write the card of a model (or of a config, then pass `num_parameters=`) as `directory/README.md`.

    `plot` may be a path to an existing image outside `directory`: it is copied in and the card embeds its file
    name. Other keyword arguments are those of `make_model_card`.
    """
    if isinstance(model_or_config, TTTConfig):
        config = model_or_config
        if "num_parameters" not in kwargs:
            raise ValueError("write_model_card(config, ...) needs num_parameters=; pass the model to count them.")
    else:
        config = model_or_config.config
        kwargs.setdefault("num_parameters", model_or_config.num_parameters())
    os.makedirs(directory, exist_ok=True)
    plot = kwargs.get("plot")
    if plot is not None and os.path.isfile(plot):
        name = os.path.basename(plot)
        target = os.path.join(directory, name)
        if not os.path.exists(target) or not os.path.samefile(plot, target):
            shutil.copyfile(plot, target)
        kwargs["plot"] = name
    card = make_model_card(config, **kwargs)
    card.save(os.path.join(directory, "README.md"))
    return card


# ----------------------------------------------------------------------------------------------------------------
# push_to_hub
# ----------------------------------------------------------------------------------------------------------------


def push_model_to_hub(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    tokenizer=None,
    model_card: ModelCard | None = None,
    **card_kwargs,
) -> CommitInfo:
    """Save `model` (and `tokenizer`) to a temporary folder, write its TTT card there, upload the folder in one commit.

    Follows `transformers.utils.hub.PushToHubMixin.push_to_hub` (same arguments, the same `hf_api()` client, the same
    `_upload_modified_files` commit) except for the card: transformers keeps the card already on the Hub or writes a
    blank one; this writes the TTT card (`make_model_card(..., **card_kwargs)`), or `model_card` when given.
    """
    from transformers.utils import hub  # looked up at call time, so tests can replace `hub.hf_api`

    all_tags = list(model.model_tags or [])
    for tag in _as_list(tags):
        if tag not in all_tags:
            all_tags.append(tag)

    repo_id = hub.hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
        if model_card is not None:
            model_card.save(os.path.join(tmp_dir, "README.md"))
        else:
            card_kwargs.setdefault("repo_id", repo_id)
            write_model_card(model, tmp_dir, tags=all_tags, **card_kwargs)
        return model._upload_modified_files(
            tmp_dir,
            repo_id,
            files_timestamps={},
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            revision=revision,
            commit_description=commit_description,
        )


__all__ = ["make_model_card", "write_model_card", "push_model_to_hub", "template_path"]
