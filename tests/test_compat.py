"""The cache argument on every supported transformers release (`modeling_ttt/compat.py`), no deprecation warnings
in normal use, and the errors for inputs generate() cannot take."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPast

from conftest import tiny_model
from modeling_ttt import TTTCache
from modeling_ttt.compat import CACHE_NAME, cache_of, resolve_cache

PAD = 0


def random_ids(batch, length, seed=0):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_cache_name_is_the_installed_releases():
    fields = BaseModelOutputWithPast.__dataclass_fields__
    assert CACHE_NAME in fields
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    assert CACHE_NAME == ("cache" if (major, minor) >= (5, 24) else "past_key_values")


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_both_names_continue_the_same_state(name):
    model = tiny_model("linear", "mamba")
    ids = random_ids(2, 21)
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :13], use_cache=True)
        cache = cache_of(first)
        assert isinstance(cache, TTTCache) and cache is first[CACHE_NAME]
        second = model(ids[:, 13:], **{name: cache}, use_cache=True)
        assert cache_of(second) is cache
        inner = model.model(ids[:, 13:16], **{name: cache})
        assert cache_of(inner) is cache
    torch.testing.assert_close(second.logits, whole[:, 13:], atol=1e-5, rtol=1e-5)
    assert cache.seen_tokens().tolist() == [24, 24]


def test_two_different_caches_are_refused():
    model = tiny_model("linear", "transformer")
    ids = random_ids(1, 5)
    one, other = TTTCache(model.config), TTTCache(model.config)
    with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
        model(ids, cache=one, past_key_values=other)
    with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
        model.model(ids, cache=one, past_key_values=other)
    model(ids, cache=one, past_key_values=one)  # the same object twice is one cache
    assert one.seen_tokens().tolist() == [5]
    assert resolve_cache(None, other) is other and resolve_cache(one, None) is one


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_generate_continues_a_cache_passed_under_either_name(name):
    model = tiny_model("linear", "mamba")
    prompt = random_ids(1, 11, seed=3)
    kwargs = dict(do_sample=False, pad_token_id=PAD, max_new_tokens=6, min_new_tokens=6)
    whole = model.generate(prompt, max_length=11 + 12, min_length=11 + 12, do_sample=False, pad_token_id=PAD)
    first = model.generate(prompt, return_dict_in_generate=True, **kwargs)
    cache = cache_of(first)
    assert isinstance(cache, TTTCache)
    second = model.generate(first.sequences, return_dict_in_generate=True, **{name: cache}, **kwargs)
    assert cache_of(second) is cache
    assert torch.equal(second.sequences, whole)


def test_stream_continues_a_cache():
    model = tiny_model("mlp", "mamba")
    ids = random_ids(1, 40, seed=4)
    whole = model.stream(ids, progress=False)
    cache = TTTCache(model.config)
    with torch.no_grad():
        model(ids[:, :1], cache=cache)
    rest = model.stream(ids[:, 1:], chunk_size=7, cache=cache, progress=False)
    torch.testing.assert_close(rest.token_nll, whole.token_nll[:, 1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
        model.stream(ids, cache=TTTCache(model.config), past_key_values=TTTCache(model.config), progress=False)


def test_a_plain_run_prints_no_deprecation_warning():
    """A fresh process (warnings are printed once per process): forward, generate, stream and a training step."""
    script = textwrap.dedent("""
        import sys, warnings
        warnings.simplefilter("always")
        sys.path.insert(0, %r)
        import torch
        from conftest import tiny_model
        model = tiny_model("linear", "mamba")
        ids = torch.randint(1, 97, (2, 19))
        with torch.no_grad():
            out = model(ids, use_cache=True)
        print(type(out[%r]).__name__)
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        model.stream(ids[0], progress=False)
        model.train()
        model(ids, labels=ids).loss.backward()
    """ % (os.path.dirname(__file__), CACHE_NAME))
    env = {**os.environ, "TTT_IMPL": "torch"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "TTTCache"
    assert "deprecat" not in result.stderr.lower(), result.stderr


# -- inputs generate() and forward cannot take ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_input", "fragment"),
    [
        (lambda: random_ids(1, 5)[0], r"input_ids given to generate\(\) must be 2-D \(batch, seq_len\), got shape \(5,\)"),
        (lambda: random_ids(1, 5).float(), "input_ids must hold integer token ids, got dtype torch.float32"),
        (lambda: torch.zeros(1, 0, dtype=torch.long), r"generate\(\) needs a prompt of at least one token"),
    ],
    ids=["1-D", "float", "empty"],
)
def test_generate_refuses_prompts_it_cannot_take(make_input, fragment):
    model = tiny_model("linear", "transformer")
    with pytest.raises(ValueError, match=fragment):
        model.generate(make_input(), max_new_tokens=3, pad_token_id=PAD)
    with pytest.raises(ValueError, match=fragment.replace(r"given to generate\(\) ", "")
                       .replace(r"generate\(\) needs a prompt of at least one token", r"The input holds no tokens")):
        model(make_input())


def test_stream_refuses_float_token_ids():
    model = tiny_model("linear", "transformer")
    with pytest.raises(ValueError, match="input_ids must hold integer token ids, got dtype torch.float32"):
        model.stream(torch.tensor([1.7, 2.0, 3.0]), progress=False)


def test_position_ids_errors_say_who_built_them():
    """Ids the caller passed are reported as theirs; ids generate() built (it marks its inputs) as a cache that
    did not see the prefix — never "omit position_ids" to a caller who passed none."""
    model = tiny_model("linear", "transformer")
    ids = random_ids(1, 4)
    late = torch.arange(21, 25).unsqueeze(0)
    with pytest.raises(ValueError, match="The position_ids you passed disagree") as passed:
        model(ids, position_ids=late, cache=TTTCache(model.config))
    assert "cache has seen 0 tokens" in str(passed.value)
    inputs = model.prepare_inputs_for_generation(ids, attention_mask=None, position_ids=late,
                                                 **{CACHE_NAME: TTTCache(model.config)})
    assert inputs["from_generate"] is True
    with pytest.raises(ValueError, match=r"generate\(\) builds position_ids") as built:
        model(**inputs)
    message = str(built.value)
    assert "not the one that saw the beginning" in message and "omit" not in message


def test_mask_errors_say_who_built_the_mask():
    model = tiny_model("linear", "transformer")
    ids = random_ids(1, 2)
    wide = torch.ones(1, 9, dtype=torch.long)  # 7 past columns, but the cache saw nothing
    with pytest.raises(ValueError, match="The attention_mask you passed has 9 columns for 2 new tokens"):
        model(ids, attention_mask=wide, cache=TTTCache(model.config))
    with pytest.raises(ValueError, match=r"generate\(\) passed the attention mask of the whole sequence"):
        model(ids, attention_mask=wide, cache=TTTCache(model.config), from_generate=True)


def test_generate_with_a_cache_that_read_the_whole_prompt_says_so():
    model = tiny_model("linear", "mamba")
    prompt = random_ids(1, 6, seed=5)
    cache = TTTCache(model.config)
    with torch.no_grad():
        model(prompt, cache=cache)
    with pytest.raises(ValueError, match=r"has already read 6 positions, as many as the input has \(6\)"):
        model.generate(prompt, cache=cache, max_new_tokens=2, pad_token_id=PAD)
    more = torch.cat([prompt, random_ids(1, 1, seed=6)], dim=1)  # one unread token: continues the state
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(more, cache=cache, **kwargs), model.generate(more, **kwargs))
