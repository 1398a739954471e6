"""Backprop by exact inversion (``bk.sample_reversible``) against full autograd through the same
sampler (``sample_autograd``): gradients for every kind of argument, DRaFT-K and the gradient
hook, rebuild drift against the error model, memory flat in the number of steps, bad input."""

import functools
import math

import pytest
import torch

import belm_kernels as bk
from belm_kernels.reversible import peak_memory, rebuild_bound, sample_autograd

VP = bk.Schedule.from_betas(0.00085, 0.012, "scaled_linear")
FLOW = bk.FlowSchedule(shift=3.0)
SCHEDULES = {"vp": VP, "flow": FLOW}
EXACT = ("obelm", "bdia", "edict")
DIM = 8


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class TimeMLP(torch.nn.Module):
    """model(x, t, cond): a 2-layer MLP of x + cond and the model time (int t or float sigma)."""

    def __init__(self, dim=DIM, hidden=32, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.inp = torch.nn.Linear(dim + 1, hidden)
            self.out = torch.nn.Linear(hidden, dim)

    def forward(self, x, t, cond=None):
        h = x if cond is None else x + cond
        tt = torch.full((x.shape[0], 1), float(t) / (1000 if isinstance(t, int) else 1),
                        dtype=x.dtype, device=x.device)
        return self.out(torch.tanh(self.inp(torch.cat([h, tt], 1))))


def randn(*shape, seed, dtype=torch.float64, grad=True):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t.to(dtype).requires_grad_(grad)


def gradients(fn, sampler, model, x_T, x_T2, cond, wrt, weight, **kw):
    out = fn(sampler, model, x_T, x_T2, cond=cond, **kw)
    grads = torch.autograd.grad((out.double() * weight).sum(), wrt, allow_unused=True,
                                retain_graph=True)  # the conditioning's graph serves twice
    return out.detach(), grads


def assert_grads_match(got, want, tol):
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g is None) == (w is None), f"gradient {k}: {g is None} vs {w is None}"
        if w is not None:
            assert rel(g, w) <= tol, f"gradient {k}: relative error {rel(g, w):.2e}"


# ------------------------------------------------------------------ float64: equal to autograd


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("pair", [False, True], ids=["x_T", "pair"])
def test_mlp_gradients_equal_full_autograd(kind, name, pair):
    sampler = bk.get_sampler(name, SCHEDULES[kind], 10)
    model = TimeMLP().double()
    x_T = randn(4, DIM, seed=1)
    x_T2 = randn(4, DIM, seed=2) if pair else None
    leaf = randn(DIM, seed=3)
    cond = torch.sin(leaf) * 2                  # non-leaf conditioning
    wrt = [x_T, *([x_T2] if pair else []), leaf, cond, *model.parameters()]
    weight = randn(4, DIM, seed=4, grad=False)
    out, got = gradients(bk.sample_reversible, sampler, model, x_T, x_T2, (cond,), wrt, weight)
    ref, want = gradients(sample_autograd, sampler, model, x_T, x_T2, (cond,), wrt, weight)
    plain = sampler.sample(lambda x, t: model(x, t, cond.detach()), x_T.detach(),
                           None if x_T2 is None else x_T2.detach())
    assert torch.equal(out, plain) and torch.equal(ref, plain)   # the same states, bit for bit
    assert_grads_match(got, want, 1e-10)


@functools.cache
def tiny_sd(sample_size=8):
    from belm_kernels.diffusers import tiny_stable_diffusion_pipeline

    pipe = tiny_stable_diffusion_pipeline(sample_size=sample_size, dtype=torch.float64)
    for module in (pipe.unet, pipe.text_encoder):
        module.requires_grad_(False)
    return pipe


def cfg_unet(unet, guidance):
    def model(x, t, embeds):                    # embeds: [negative, positive] stacked
        noise = unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample
        uncond, text = noise.chunk(2)
        return uncond + guidance * (text - uncond)
    return model


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("name", EXACT)
def test_unet_cfg_gradients_equal_full_autograd(kind, name):
    """Tiny SD UNet with classifier-free guidance in float64: gradients to x_T and x_T2, to the
    prompt embeddings (a non-leaf from the text encoder, and through them to a text-encoder
    weight), and to UNet weights (a LoRA-like subset), equal to full autograd's."""
    pytest.importorskip("diffusers")
    pipe = tiny_sd()
    unet, text_encoder = pipe.unet, pipe.text_encoder
    tuned = [unet.conv_out.weight, unet.down_blocks[1].attentions[0].transformer_blocks[0]
             .attn2.to_k.weight, text_encoder.get_parameter("final_layer_norm.weight")]
    for p in tuned:
        p.requires_grad_(True)
    try:
        ids = pipe.tokenizer(["", "a red fox"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        embeds = text_encoder(ids)[0]           # non-leaf, under autograd
        assert embeds.grad_fn is not None
        sampler = bk.get_sampler(name, SCHEDULES[kind], 5)
        model = cfg_unet(unet, 3.0)
        x_T, x_T2 = randn(1, 4, 8, 8, seed=5), randn(1, 4, 8, 8, seed=6)
        weight = randn(1, 4, 8, 8, seed=7, grad=False)
        wrt = [x_T, x_T2, embeds, *tuned]
        _, got = gradients(bk.sample_reversible, sampler, model, x_T, x_T2, (embeds,), wrt,
                           weight)
        _, want = gradients(sample_autograd, sampler, model, x_T, x_T2, (embeds,), wrt, weight)
        assert_grads_match(got, want, 1e-10)
    finally:
        for p in tuned:
            p.requires_grad_(False)


def test_captured_and_step_dependent_leaves_get_their_gradients():
    """Leaves the model reaches by closure (directly, or behind a non-leaf it closes over, whose
    graph then serves every step), and leaves it uses only at some steps, are found."""
    sampler = bk.get_sampler("obelm", VP, 8)
    early, late, behind = randn(DIM, seed=8), randn(DIM, seed=9), randn(DIM, seed=27)
    captured = behind.exp()                     # a non-leaf made before the chain
    mlp = TimeMLP().double()

    def model(x, t):
        return mlp(x, t) + (early if t > 500 else late) * x + captured

    x_T = randn(3, DIM, seed=10)
    wrt = [x_T, early, late, behind, *mlp.parameters()]
    weight = randn(3, DIM, seed=11, grad=False)
    _, got = gradients(bk.sample_reversible, sampler, model, x_T, None, (), wrt, weight)
    _, want = gradients(sample_autograd, sampler, model, x_T, None, (), wrt, weight)
    assert_grads_match(got, want, 1e-10)


def test_backward_accumulates_into_grad_and_can_run_twice():
    sampler = bk.get_sampler("edict", FLOW, 6)
    model = TimeMLP().double()
    x_T = randn(2, DIM, seed=12)
    out = bk.sample_reversible(sampler, model, x_T)
    out.square().sum().backward(retain_graph=True)
    first = [x_T.grad.clone(), *(p.grad.clone() for p in model.parameters())]
    out.square().sum().backward()               # accumulates: twice the gradient
    for g, p in zip(first, [x_T, *model.parameters()], strict=True):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-14, atol=0)


# ------------------------------------------------------------------ DRaFT-K and the hook


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("k", [1, 3])
def test_last_k_equals_truncated_autograd(name, k):
    sampler = bk.get_sampler(name, FLOW, 8)
    model = TimeMLP().double()
    x_T, cond = randn(3, DIM, seed=13), randn(DIM, seed=14)
    wrt = [cond, *model.parameters()]
    weight = randn(3, DIM, seed=15, grad=False)
    _, got = gradients(bk.sample_reversible, sampler, model, x_T, None, (cond,), wrt, weight,
                       last_k=k)
    _, want = gradients(sample_autograd, sampler, model, x_T, None, (cond,), wrt, weight,
                        last_k=k)
    assert_grads_match(got, want, 1e-10)
    out = bk.sample_reversible(sampler, model, x_T, cond=cond, last_k=k)
    assert torch.autograd.grad(out.sum(), x_T, allow_unused=True)[0] is None  # cut before


@pytest.mark.parametrize("name", ["obelm", "edict"])
def test_grad_hook_sees_every_step_and_can_replace_the_gradient(name):
    """Zeroing the carried gradient after step j stops it there: the parameters then get the
    gradients of DRaFT-K with K = the steps after j, and x_T none."""
    n, j_cut = 8, 4
    sampler = bk.get_sampler(name, VP, n)
    model = TimeMLP().double()
    x_T = randn(3, DIM, seed=16)
    seen = []

    def hook(step, grads):
        assert len(grads) == 2 and all(g.shape == x_T.shape for g in grads)
        seen.append(step)
        if step == j_cut:
            return tuple(torch.zeros_like(g) for g in grads)
        return None

    params = list(model.parameters())
    out = bk.sample_reversible(sampler, model, x_T, grad_hook=hook)
    got = torch.autograd.grad(out.square().sum(), [x_T, *params])
    assert seen == list(range(n - 1, -1, -1))
    assert float(got[0].abs().max()) == 0
    out = bk.sample_reversible(sampler, model, x_T, last_k=n - 1 - j_cut)
    want = torch.autograd.grad(out.square().sum(), params)
    assert_grads_match(got[1:], want, 1e-12)


def test_grad_hook_scaling_in_place_scales_the_gradient():
    sampler = bk.get_sampler("obelm", VP, 6)
    model = TimeMLP().double()
    x_T = randn(2, DIM, seed=17)

    def halve_last(step, grads):
        if step == sampler.num_steps - 1:
            for g in grads:
                g.mul_(0.5)

    out = bk.sample_reversible(sampler, model, x_T, grad_hook=halve_last)
    got = torch.autograd.grad(out.square().sum(), x_T)[0]
    out = bk.sample_reversible(sampler, model, x_T)
    want = torch.autograd.grad(out.square().sum(), x_T)[0]
    assert rel(got, 0.5 * want) <= 1e-14


# ------------------------------------------------------------------ low precision: the bound


def recording(model):
    """model wrapped to record its inputs: the forward pass's, then the backward pass's."""
    seen = []

    def fn(x, t, *cond):
        seen.append(x.detach().clone())
        return model(x, t, *cond)
    return fn, seen


def drift(sampler, model, x_T, state_dtype=None):
    """Rebuild drift: max |rebuilt - forward| over the model inputs, relative to the largest."""
    fn, seen = recording(model)
    out = bk.sample_reversible(sampler, fn, x_T, state_dtype=state_dtype)
    calls = len(seen)
    out.double().square().sum().backward()
    forward, rebuilt = seen[:calls], seen[calls:][::-1]
    assert len(rebuilt) == calls
    scale = max(float(x.double().abs().max()) for x in forward)
    return max(float((a.double() - b.double()).abs().max())
               for a, b in zip(forward, rebuilt, strict=True)) / scale, forward, rebuilt


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rebuild_drift_within_the_error_model(kind, name, dtype):
    sampler = bk.get_sampler(name, SCHEDULES[kind], 10)
    model = TimeMLP(dim=32, hidden=64).to(dtype)
    x_T = randn(8, 32, seed=18, dtype=dtype)
    measured, _, _ = drift(sampler, model, x_T)
    assert measured <= rebuild_bound(sampler, dtype)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_wide_states_give_the_model_its_forward_latents_back(kind):
    """float32 latents, float64 states: the rebuilt float64 states are within the float64 bound,
    far below half a float32 ulp, so the model's float32 inputs come back within one ulp (and
    equal unless a state lies that close to a rounding boundary)."""
    sampler = bk.get_sampler("obelm", SCHEDULES[kind], 10)
    model = TimeMLP(dim=32, hidden=64).float()
    x_T = randn(8, 32, seed=19, dtype=torch.float32)
    bound64 = rebuild_bound(sampler, torch.float64)
    assert bound64 < torch.finfo(torch.float32).eps / 4
    _, forward, rebuilt = drift(sampler, model, x_T, state_dtype=torch.float64)
    for a, b in zip(forward, rebuilt, strict=True):
        ulp = torch.finfo(torch.float32).eps * a.abs().clamp_min(torch.finfo(torch.float32).tiny)
        assert bool(((a - b).abs() <= ulp).all())


def test_16_bit_latents_keep_float32_states_by_default():
    sampler = bk.get_sampler("obelm", FLOW, 6)
    model = TimeMLP().to(torch.bfloat16)
    x_T = randn(2, DIM, seed=28, dtype=torch.bfloat16)
    out = bk.sample_reversible(sampler, model, x_T)
    wide = bk.sample_reversible(sampler, model, x_T, state_dtype=torch.float32)
    assert out.dtype == torch.bfloat16 and torch.equal(out, wide)
    with pytest.warns(RuntimeWarning, match="nor the gradients can be trusted"):  # 16-bit states
        bk.sample_reversible(sampler, model, x_T, state_dtype=torch.bfloat16)


def test_autocast_is_reentered_in_the_backward_pass():
    """Under CPU autocast (bfloat16 matmuls) the backward re-evaluation must run the model as the
    forward pass did: with float64 states its float32 inputs come back within one ulp (far from
    the bfloat16-sized differences a float32 re-evaluation would give)."""
    sampler = bk.get_sampler("obelm", VP, 10)
    model = TimeMLP(dim=32, hidden=64).float()
    x_T = randn(8, 32, seed=30, dtype=torch.float32)
    fn, seen = recording(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bk.sample_reversible(sampler, fn, x_T, state_dtype=torch.float64)
    out.float().square().sum().backward()
    calls = len(seen) // 2
    for a, b in zip(seen[:calls], seen[calls:][::-1], strict=True):
        ulp = torch.finfo(torch.float32).eps * a.abs().clamp_min(torch.finfo(torch.float32).tiny)
        assert bool(((a - b).abs() <= ulp).all())


@pytest.mark.parametrize("name", EXACT)
def test_float32_gradient_of_a_linear_model_within_rounding(name):
    """A model linear in x has a Jacobian that does not depend on the state, so the gradient with
    respect to x_T does not see the rebuild drift at all: reversible and full autograd run the
    same adjoint recursion in float32 and differ by its rounding, at most a few eps per line,
    grown by the sampling direction's parasitic mode (bounded as for the rebuild)."""
    sampler = bk.get_sampler(name, VP, 10)
    weight = torch.nn.Linear(DIM, DIM).float()
    torch.nn.init.normal_(weight.weight, std=0.3)

    def model(x, t):
        return weight(x) * (1 + float(t) / 1000)

    x_T = randn(4, DIM, seed=20, dtype=torch.float32)
    got = torch.autograd.grad(bk.sample_reversible(sampler, model, x_T).square().sum(), x_T)[0]
    want = torch.autograd.grad(sample_autograd(sampler, model, x_T).square().sum(), x_T)[0]
    assert rel(got, want) <= 2 * rebuild_bound(sampler, torch.float32)


# ------------------------------------------------------------------ memory


def _peak(fn, sampler, model, x_T):
    def run():
        out = fn(sampler, model, x_T)
        out.square().sum().backward()
    return peak_memory(run)[1]


def test_memory_does_not_grow_with_the_number_of_steps():
    """CPU allocations (the profiler's memory events) of forward + backward: reversible's peak
    grows by less than one latent from 10 to 40 steps (only the coefficient tables grow),
    full autograd's by at least the activations of the 30 extra model calls."""
    model = TimeMLP(dim=256, hidden=512).double()
    x_T = randn(16, 256, seed=21)
    latent = x_T.numel() * x_T.element_size()
    peaks = {}
    for fn in (bk.sample_reversible, sample_autograd):
        peaks[fn.__name__] = [_peak(fn, bk.get_sampler("obelm", VP, n), model, x_T)
                              for n in (10, 40)]
    rev, full = peaks["sample_reversible"], peaks["sample_autograd"]
    assert rev[1] - rev[0] < latent
    hidden = 16 * 512 * x_T.element_size()
    assert full[1] - full[0] >= 30 * hidden       # each call keeps at least its hidden layer
    assert rev[1] < full[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", EXACT)
def test_cuda_gradients_and_flat_memory(name):
    """On a GPU (every backend the op has there): gradients equal full autograd's in float64,
    and the caching allocator's peak grows by less than one latent from 10 to 40 steps."""
    model = TimeMLP(dim=256, hidden=512).double().cuda()
    x_T = randn(16, 256, seed=29).cuda().detach().requires_grad_()
    wrt = [x_T, *model.parameters()]
    for backend in bk.available_backends("cuda"):
        sampler = bk.get_sampler(name, FLOW, 10)
        got = torch.autograd.grad(bk.sample_reversible(sampler, model, x_T, backend=backend)
                                  .square().sum(), wrt)
        want = torch.autograd.grad(sample_autograd(sampler, model, x_T, backend=backend)
                                   .square().sum(), wrt)
        assert_grads_match(got, want, 1e-10)
    latent = x_T.numel() * x_T.element_size()
    peaks = []
    for n in (10, 40):
        sampler = bk.get_sampler(name, FLOW, n)
        peaks.append(peak_memory(lambda s=sampler: bk.sample_reversible(s, model, x_T)
                                 .square().sum().backward(), "cuda")[1])
    assert peaks[1] - peaks[0] < latent


# ------------------------------------------------------------------ bad input


def test_inexact_samplers_are_refused_naming_the_exact_ones():
    model, x_T = TimeMLP().double(), randn(2, DIM, seed=22)
    for sampler in (bk.get_sampler("ddim", VP, 5), bk.get_sampler("euler", FLOW, 5)):
        with pytest.raises(ValueError, match="'obelm', 'bdia', 'edict'") as info:
            bk.sample_reversible(sampler, model, x_T)
        assert repr(sampler.name) in str(info.value)
    with pytest.raises(ValueError, match="gamma=0"):
        bk.sample_reversible(bk.get_sampler("bdia", VP, 5, gamma=0.0), model, x_T)
    with pytest.raises(TypeError, match="sampler must be"):
        bk.sample_reversible("obelm", model, x_T)


def test_dropout_in_training_mode_is_refused():
    sampler = bk.get_sampler("obelm", VP, 5)
    net = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.Dropout(0.1)).double()
    x_T = randn(2, DIM, seed=23)
    for model in (lambda x, t: net(x), net.forward, functools.partial(net.__call__)):
        with pytest.raises(ValueError, match=r"dropout in training mode .*\.eval\(\)"):
            bk.sample_reversible(sampler, model, x_T)
    net.eval()
    bk.sample_reversible(sampler, lambda x, t: net(x), x_T).sum().backward()


def test_nothing_requiring_grad_is_an_error():
    sampler = bk.get_sampler("obelm", VP, 5)
    model = TimeMLP().double().requires_grad_(False)
    x_T = randn(2, DIM, seed=24, grad=False)
    with pytest.raises(ValueError, match="nothing requires grad"):
        bk.sample_reversible(sampler, model, x_T)
    with pytest.raises(ValueError, match="last_k=2 of 5 steps x_T and x_T2 get no gradient"):
        bk.sample_reversible(sampler, model, x_T.requires_grad_(), last_k=2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="grad mode disabled"):
        bk.sample_reversible(sampler, TimeMLP().double(), x_T)


def test_other_bad_input():
    sampler = bk.get_sampler("obelm", VP, 5)
    model, x_T = TimeMLP().double(), randn(2, DIM, seed=25)
    with pytest.raises(ValueError, match=r"last_k must be None or an int in \[1, 5\]"):
        bk.sample_reversible(sampler, model, x_T, last_k=6)
    with pytest.raises(ValueError, match=r"last_k .* \[1, 4\]"):   # from the pair: 4 steps
        bk.sample_reversible(sampler, model, x_T, x_T.detach(), last_k=5)
    with pytest.raises(ValueError, match="state_dtype must be at least as precise"):
        bk.sample_reversible(sampler, model, x_T, state_dtype=torch.float32)
    with pytest.raises(TypeError, match="grad_hook must be callable"):
        bk.sample_reversible(sampler, model, x_T, grad_hook=3)
    with pytest.raises(TypeError, match=r"cond\[1\] must be a tensor"):
        bk.sample_reversible(sampler, model, x_T, cond=(x_T, 1.0))
    with pytest.raises(TypeError, match="model must be callable"):
        bk.sample_reversible(sampler, None, x_T)
    with pytest.raises(ValueError, match="x_T2 must have x_T's shape"):
        bk.sample_reversible(sampler, model, x_T, x_T[:1])

    def detached(x, t):
        with torch.no_grad():
            return model(x, t)

    with pytest.raises(RuntimeError, match="does not require grad"):
        bk.sample_reversible(sampler, detached, x_T)
    out = bk.sample_reversible(sampler, model, x_T, grad_hook=lambda j, g: "junk")
    with pytest.raises(TypeError, match="grad_hook must return None or a pair"):
        out.sum().backward()
    out = bk.sample_reversible(sampler, model, x_T)
    (g,) = torch.autograd.grad(out.square().sum(), x_T, create_graph=True)  # double backward
    with pytest.raises(RuntimeError, match="differentiate twice .* @once_differentiable"):
        g.sum().backward()


def test_untrustworthy_bound_warns():
    model, x_T = TimeMLP().double(), randn(2, DIM, seed=26)
    sampler = bk.get_sampler("bdia", VP, 60)    # inversion divides by gamma = 0.5: 2^60
    assert rebuild_bound(sampler, torch.float64) >= 1
    with pytest.warns(RuntimeWarning, match="nor the gradients can be trusted"):
        bk.sample_reversible(sampler, model, x_T)
    assert math.isfinite(rebuild_bound(bk.get_sampler("obelm", VP, 60), torch.float64))


def readme_blocks():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Gradients through sampling", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_snippet_runs_as_written(capsys):
    exec(compile(readme_blocks()[0], "README.md", "exec"), {})
    assert float(capsys.readouterr().out) < 1e-12   # the same gradient as full autograd
