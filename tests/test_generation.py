"""generate() with the recurrent TTTCache: token-for-token equal to generating without a cache (greedy, seeded
sampling, beam search), batched left padding equal to each prompt alone, chunked prefill, streamers, thousands of
new tokens at constant state size, multi-turn continuation from a returned cache, and refused modes."""

import copy
import threading

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TextIteratorStreamer, TextStreamer
from transformers.generation.streamers import BaseStreamer

from conftest import tiny_model
from modeling_ttt.compat import cache_of
from modeling_ttt import TTTCache

PAD = 0
VARIANT_SUBSET = [("linear", "mamba"), ("mlp", "transformer")]


def prompt(length, seed=0):
    return torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(seed))


def left_pad(prompts):
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1]:] = p[0]
        mask[row, width - p.shape[1]:] = 1
    return ids, mask


def generate(model, ids, **kwargs):
    kwargs.setdefault("pad_token_id", PAD)
    return model.generate(ids, **kwargs)


def count_forward_lengths(model):
    """Record the sequence length of every forward (to see what generate feeds)."""
    lengths = []
    handle = model.model.embed_tokens.register_forward_hook(lambda _m, args, _out: lengths.append(args[0].shape[1]))
    return lengths, handle


# -- greedy, sampling, beam search -----------------------------------------------------------------------------


def test_greedy_uses_the_cache_and_equals_no_cache(variant):
    model = tiny_model(*variant)
    ids = prompt(13)
    lengths, handle = count_forward_lengths(model)
    out = generate(model, ids, max_new_tokens=20, min_new_tokens=20, return_dict_in_generate=True)
    handle.remove()
    assert lengths == [13] + [1] * 19  # prefill once, then one token per step: the cache is on by default
    assert isinstance(cache_of(out), TTTCache)
    assert cache_of(out).get_seq_length() == 13 + 19
    no_cache = generate(model, ids, max_new_tokens=20, min_new_tokens=20, use_cache=False)
    assert torch.equal(out.sequences, no_cache)


def test_batched_left_padded_greedy_equals_each_prompt_alone(variant):
    model = tiny_model(*variant)
    prompts = [prompt(n, seed=n) for n in (1, 5, 16, 17, 33)]
    ids, mask = left_pad(prompts)
    batched = generate(model, ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12)
    for row, p in enumerate(prompts):
        alone = generate(model, p, max_new_tokens=12, min_new_tokens=12)
        assert torch.equal(batched[row, ids.shape[1]:], alone[0, p.shape[1]:]), f"prompt of length {p.shape[1]}"


@pytest.mark.parametrize("seed", [0, 1])
def test_sampling_with_cache_equals_no_cache_under_the_same_seed(variant, seed):
    model = tiny_model(*variant)
    ids, mask = left_pad([prompt(9, seed=3), prompt(4, seed=4)])
    kwargs = dict(attention_mask=mask, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, num_return_sequences=3,
                  max_new_tokens=15)
    torch.manual_seed(seed)
    cached = generate(model, ids, **kwargs)
    torch.manual_seed(seed)
    uncached = generate(model, ids, use_cache=False, **kwargs)
    assert cached.shape[0] == 6
    assert torch.equal(cached, uncached)
    torch.manual_seed(seed + 100)
    assert not torch.equal(generate(model, ids, **kwargs), cached)  # it really samples


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_equals_no_cache(variant, num_beams):
    model = tiny_model(*variant)
    ids, mask = left_pad([prompt(11, seed=5), prompt(6, seed=6)])
    kwargs = dict(attention_mask=mask, num_beams=num_beams, num_return_sequences=2, max_new_tokens=10,
                  return_dict_in_generate=True, output_scores=True)
    cached = generate(model, ids, **kwargs)
    uncached = generate(model, ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 5, 8])
def test_prefill_chunk_size_equals_one_prefill(chunk):
    for variant in VARIANT_SUBSET:
        model = tiny_model(*variant)
        ids, mask = left_pad([prompt(23, seed=7), prompt(10, seed=8)])
        kwargs = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, output_logits=True,
                      return_dict_in_generate=True)
        chunked = generate(model, ids, prefill_chunk_size=chunk, **kwargs)
        whole = generate(model, ids, **kwargs)
        assert torch.equal(chunked.sequences, whole.sequences)
        assert torch.equal(chunked.sequences, generate(model, ids, use_cache=False, **kwargs).sequences)
        for a, b in zip(chunked.logits, whole.logits):
            assert (a - b).abs().max().item() <= 1e-5


# -- streamers -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the tiny vocabulary, built locally (nothing from the Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    assert tokenizer("w9 w10 w11").input_ids == [9, 10, 11]
    return tokenizer


def test_text_streamer_prints_the_generated_text(tokenizer, capsys):
    model = tiny_model("linear", "mamba")
    ids = tokenizer("w5 w17 w33 w41 w8", return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = generate(model, ids, streamer=streamer, max_new_tokens=12, min_new_tokens=12)
    printed = capsys.readouterr().out
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert expected and printed.strip() == expected.strip()


def test_text_iterator_streamer_yields_the_generated_text(tokenizer):
    model = tiny_model("mlp", "mamba")
    ids = tokenizer("w9 w10 w11", return_tensors="pt").input_ids
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=generate(
        model, ids, streamer=streamer, max_new_tokens=10, min_new_tokens=10)))
    thread.start()
    pieces = list(streamer)
    thread.join()
    expected = tokenizer.decode(result["out"][0, ids.shape[1]:], skip_special_tokens=True)
    assert len(pieces) > 1 and "".join(pieces).strip() == expected.strip()


# -- thousands of new tokens -------------------------------------------------------------------------------------


class CacheSizeRecorder(BaseStreamer):
    """A streamer (called once per step) that records the size of the cache generate is using."""

    def __init__(self, cache):
        self.cache, self.sizes = cache, []

    def put(self, value):
        self.sizes.append(self.cache.nbytes() if self.cache.is_initialized else 0)

    def end(self):
        pass


def test_two_thousand_new_tokens_keep_the_state_size_constant_and_stay_exact():
    model = tiny_model("linear", "mamba")
    ids = prompt(10, seed=9)
    cache = TTTCache(model.config)
    recorder = CacheSizeRecorder(cache)
    new = 2000
    out = generate(model, ids, cache=cache, streamer=recorder, max_new_tokens=new, min_new_tokens=new,
                   output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 10 + new)
    assert cache_of(out) is cache
    # put() is called for the prompt (before any forward), then once per new token
    assert len(recorder.sizes) == new + 1
    assert len(set(recorder.sizes[1:])) == 1 and recorder.sizes[1] > 0
    assert cache.get_seq_length() == 10 + new - 1
    # every step's logits equal one forward over the whole generated sequence (no drift over 2000 steps)
    with torch.no_grad():
        full = model(out.sequences[:, :-1]).logits[0, 9:]
    stepped = torch.cat(out.logits)
    assert (stepped - full).abs().max().item() <= 1e-5


# -- multi-turn continuation -------------------------------------------------------------------------------------


def test_multi_turn_continues_from_the_returned_cache(variant):
    model = tiny_model(*variant)
    first = generate(model, prompt(12, seed=10), max_new_tokens=9, min_new_tokens=9, return_dict_in_generate=True)
    history = torch.cat([first.sequences, prompt(5, seed=11)], dim=1)  # the user's reply
    # an explicit mask, as a tokenizer gives: generated tokens may equal pad_token_id, and generate() would then
    # infer padding there (which the cache rightly refuses: it has seen those tokens)
    kwargs = dict(attention_mask=torch.ones_like(history), max_new_tokens=10, min_new_tokens=10)
    lengths, handle = count_forward_lengths(model)
    second = generate(model, history, cache=cache_of(first), **kwargs)
    handle.remove()
    assert lengths[0] == 1 + 5  # the last generated token (never fed) and the reply; not the history
    assert torch.equal(second, generate(model, history, use_cache=False, **kwargs))


@pytest.mark.parametrize("extra_padding", [0, 2])
def test_batched_multi_turn_with_padding(extra_padding):
    """Left-padded rows; with extra_padding every row (even the longest) starts with padding."""
    for variant in VARIANT_SUBSET:
        model = tiny_model(*variant)
        ids, mask = left_pad([prompt(3, seed=12), prompt(7, seed=13)])
        ids = torch.cat([torch.full((2, extra_padding), PAD), ids], dim=1)
        mask = torch.cat([torch.zeros(2, extra_padding, dtype=torch.long), mask], dim=1)
        first = generate(model, ids, attention_mask=mask, max_new_tokens=9, min_new_tokens=9,
                         return_dict_in_generate=True)
        reply = torch.randint(3, 97, (2, 4), generator=torch.Generator().manual_seed(14))
        history = torch.cat([first.sequences, reply], dim=1)
        history_mask = torch.cat([mask, torch.ones(2, 9 + 4, dtype=torch.long)], dim=1)
        kwargs = dict(attention_mask=history_mask, max_new_tokens=8, min_new_tokens=8)
        state = copy.deepcopy(cache_of(first))
        second = generate(model, history, cache=cache_of(first), **kwargs)
        assert torch.equal(second, generate(model, history, use_cache=False, **kwargs))
        # the same continuation with a chunked prefill of the new part
        assert torch.equal(second, generate(model, history, cache=state, prefill_chunk_size=3, **kwargs))


def test_continuing_with_a_cache_of_another_batch_size_is_a_clear_error():
    model = tiny_model("linear", "transformer")
    first = generate(model, prompt(4), max_new_tokens=3, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="holds state for a batch of 1 rows, but the input has 2 rows"):
        generate(model, torch.cat([first.sequences] * 2), cache=cache_of(first), max_new_tokens=3)


# -- refused modes ---------------------------------------------------------------------------------------------


def test_draft_decoding_modes_are_refused_before_any_compute():
    """transformers ≤ 5.24 refused assisted decoding for stateful models itself; 5.25 tries to record recurrent
    states to roll back to. Ours refuses every draft mode on every release, with one message."""
    model = tiny_model("linear", "mamba")
    assistant = tiny_model("linear", "mamba", seed=1)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    message = "cannot use assisted, prompt-lookup or early-exit decoding"
    with pytest.raises(ValueError, match=message + r".*assistant_model"):
        generate(model, prompt(6), assistant_model=assistant, max_new_tokens=4)
    with pytest.raises(ValueError, match=message + r".*prompt_lookup_num_tokens"):
        generate(model, prompt(6), prompt_lookup_num_tokens=3, max_new_tokens=4)
    with pytest.raises(ValueError, match=message + r".*prompt_lookup_num_tokens"):
        generate(model, prompt(6), generation_config=GenerationConfig(prompt_lookup_num_tokens=3, max_new_tokens=4))
    with pytest.raises(ValueError, match=message + r".*assistant_early_exit"):  # generate(inputs, generation_config)
        model.generate(prompt(6), GenerationConfig(assistant_early_exit=1, max_new_tokens=4, pad_token_id=PAD))
    handle.remove()
    assert calls == []


def test_the_cache_refuses_to_record_past_states():
    cache = TTTCache(tiny_model("linear", "mamba").config)
    with pytest.raises(ValueError, match="cannot record past states"):
        cache.activate_past_recording(recurrent_states_to_keep=3)


def test_logits_processors_see_cached_logits():
    """Sanity of the glue: a custom processor receives the whole sequence so far at every step."""

    class Recorder(LogitsProcessor):
        def __init__(self):
            self.lengths = []

        def __call__(self, input_ids, scores):
            self.lengths.append(input_ids.shape[1])
            return scores

    model = tiny_model("mlp", "mamba")
    recorder = Recorder()
    generate(model, prompt(7), logits_processor=LogitsProcessorList([recorder]), max_new_tokens=5,
             min_new_tokens=5)
    assert recorder.lengths == [7, 8, 9, 10, 11]
