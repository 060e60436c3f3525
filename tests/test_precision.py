"""Every dtype a user loads a model in: fp32, bf16 and fp16 weights (`from_pretrained(dtype=...)`, `.to()`,
`.half()`) and CPU autocast run forward, generate and backward, and stay close to the fp32 model with the same
weights. The rule they follow ("Precision" in `modeling_ttt/ops/state.py`): the inner loop computes and keeps
its state in float32 for 16-bit inputs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import VARIANTS, tiny_model
from modeling_ttt import TTTCache
from modeling_ttt.compat import cache_of

FIXTURES = Path(__file__).parent / "fixtures" / "ttt_jax"
# max |Δ logits| / max |logits fp32| allowed for a model run in 16 bits (bf16 keeps 8 mantissa bits, fp16 11)
RELATIVE_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
HALF_DTYPES = [torch.bfloat16, torch.float16]


def random_ids(batch, length, seed=0):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).abs().max() / expected.abs().max())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def _next_token(ids: torch.Tensor) -> torch.Tensor:
    """The rule the trained tiny model learns: a deterministic successor of the previous token."""
    return (ids * 7 + 3) % 96 + 1


@pytest.fixture(scope="module")
def trained():
    """Tiny models (both layer types) trained until their greedy predictions are confident: a random model's
    near-ties would make any rounding flip a token, which says nothing about precision."""
    models = {}
    for layer_type, backbone in (("linear", "mamba"), ("mlp", "transformer")):
        torch.manual_seed(0)
        model = tiny_model(layer_type, backbone).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
        generator = torch.Generator().manual_seed(1)
        for _ in range(120):  # typically 40 (TTT-Linear) to 80 (TTT-MLP) steps
            ids = [torch.randint(1, 97, (16, 1), generator=generator)]
            for _ in range(15):
                ids.append(_next_token(ids[-1]))
            ids = torch.cat(ids, dim=1)
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if loss.item() < 0.05:
                break
        assert loss.item() < 0.05, loss.item()
        models[layer_type] = model.eval()
    return models


def _saved(model, tmp_path) -> Path:
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{a}-{b}" for a, b in VARIANTS])
def test_16bit_weights_match_fp32(variant, dtype, tmp_path):
    model = tiny_model(*variant)
    ids = random_ids(2, 37)
    with torch.no_grad():  # the fp32 model with the same weights: the 16-bit values, upcast
        expected = tiny_model(*variant).to(dtype).float()(ids).logits
    loaded = {
        "from_pretrained": AutoModelForCausalLM.from_pretrained(_saved(model, tmp_path), dtype=dtype).eval(),
        ".to": tiny_model(*variant).to(dtype),
    }
    if dtype == torch.float16:
        loaded[".half"] = tiny_model(*variant).half()
    for route, half in loaded.items():
        assert all(p.dtype == dtype for p in half.parameters()), route
        # the fixed tables keep their exact float32 values whatever the model's dtype
        assert all(b.dtype == torch.float32 for b in half.buffers()), route
        with torch.no_grad():
            out = half(ids, use_cache=True)
        assert out.logits.dtype == dtype
        assert relative_error(out.logits, expected) <= RELATIVE_TOLERANCE[dtype], route
        state = cache_of(out).layers[0].inner_state
        assert all(t.dtype == torch.float32 for t in (*state.weights, *state.grads)), route  # the inner state


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_16bit_backward_follows_fp32(layer_type, dtype):
    ids = random_ids(2, 29, seed=1)
    reference = tiny_model(layer_type, "mamba").to(dtype).float().train()  # the same weights in fp32
    reference(ids, labels=ids).loss.backward()
    half = tiny_model(layer_type, "mamba").to(dtype).train()
    loss = half(ids, labels=ids).loss
    loss.backward()
    grads = flat_grads(half)
    assert torch.isfinite(grads).all()
    assert all(p.grad.dtype == dtype for p in half.parameters())
    assert cosine(grads, flat_grads(reference)) > 0.99


def test_bf16_prefill_equals_cached_decode():
    """At the bf16 tolerance (the two orders of the same bf16 arithmetic round differently)."""
    model = tiny_model("linear", "mamba").to(torch.bfloat16)
    ids = random_ids(2, 30, seed=2)
    with torch.no_grad():
        whole = model(ids).logits
        cache, pieces = TTTCache(model.config), []
        for start, stop in ((0, 11), *((t, t + 1) for t in range(11, 30))):
            pieces.append(model(ids[:, start:stop], cache=cache, use_cache=True).logits)
    stepped = torch.cat(pieces, dim=1)
    assert relative_error(stepped, whole) <= RELATIVE_TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_bf16_greedy_agrees_with_fp32_over_64_tokens(trained, layer_type, tmp_path):
    model = trained[layer_type]
    prompt = torch.tensor([[5, _next_token(torch.tensor(5)).item()]])
    kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kwargs)
    half = AutoModelForCausalLM.from_pretrained(_saved(model, tmp_path), dtype=torch.bfloat16).eval()
    assert torch.equal(half.generate(prompt, **kwargs), expected)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(model.generate(prompt, **kwargs), expected)


@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{a}-{b}" for a, b in VARIANTS])
def test_cpu_autocast_forward_and_backward(variant):
    ids = random_ids(2, 25, seed=3)
    reference = tiny_model(*variant).train()
    expected = reference(ids, labels=ids, return_logits=True)
    expected.loss.backward()
    model = tiny_model(*variant).train()
    with torch.autocast("cpu", torch.bfloat16):
        out = model(ids, labels=ids, return_logits=True)
        fused_loss = model(ids, labels=ids).loss.detach()  # training default: the LM head fused with the loss
    out.loss.backward()
    assert abs(float(fused_loss) - out.loss.item()) <= 1e-2 * out.loss.item()
    assert out.logits.dtype == torch.bfloat16
    assert relative_error(out.logits, expected.logits) <= RELATIVE_TOLERANCE[torch.bfloat16]
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert cosine(flat_grads(model), flat_grads(reference)) > 0.99


def test_the_cpp_kernels_step_aside_for_16bit_models(monkeypatch):
    """They take float32/64 only: a bf16 model decodes with the reference ops, kernels untouched, model unchanged."""
    from modeling_ttt.ops import cpu

    def untouchable(*args, **kwargs):
        raise AssertionError("a C++ kernel was asked to run on a 16-bit model")

    monkeypatch.setattr(cpu, "build_error", untouchable)
    monkeypatch.setattr(cpu, "_decode", untouchable)
    for impl in ("auto", "cpp"):
        model = tiny_model("linear", "mamba", ttt_impl=impl).to(torch.bfloat16)
        out = model.generate(random_ids(1, 6), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 11)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_jax_bf16_train_state_loaded_in_bf16_reproduces_the_jax_logits(tmp_path, capsys):
    from modeling_ttt.conversion.jax import main

    fixture = FIXTURES / "ttt_mlp"
    output = tmp_path / "model"
    code = main(["--checkpoint", str(fixture / "streaming_train_state"), "--jax-config", str(fixture / "config.json"),
                 "--output", str(output), "--dtype", "bfloat16", "--quiet"])
    assert code == 0, capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the stored values, exactly
    input_ids = torch.from_numpy(np.load(fixture / "input_ids.npy").astype(np.int64))
    reference = torch.from_numpy(np.load(fixture / "logits.npy"))
    with torch.no_grad():
        logits = model(input_ids).logits
    assert relative_error(logits, reference) <= 2e-2  # measured 7.3e-3 (a few bf16 roundings of the largest logit)
    assert torch.equal(logits.float().argmax(-1), reference.argmax(-1))


def test_trainer_with_bf16_on_the_cpu_lowers_the_loss(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Successors(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, index):
            ids = [index % 96 + 1]
            for _ in range(23):
                ids.append(int(_next_token(torch.tensor(ids[-1]))))
            return {"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)}

    model = tiny_model("linear", "mamba").train()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), bf16=True, use_cpu=True, per_device_train_batch_size=8,
                             max_steps=24, learning_rate=3e-2, lr_scheduler_type="constant", logging_steps=1,
                             report_to=[], save_strategy="no", log_level="error",
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Successors())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 24 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
