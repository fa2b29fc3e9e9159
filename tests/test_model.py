import numpy as np
import pytest
import torch

from heimdall.training.batch import to_inputs
from heimdall.model.features import ComplexSTFT
from heimdall.model.loss import gaussian_nll
from heimdall.config import ModelConfig
from heimdall.data.states import ABSENT, HEARD, SILENT
from heimdall.model.net import build_model


def random_batch(B=5, R=7, L=256, seed=0):
    """Random inputs with every receiver state: rx_state 0 absent, 1 silent, 2 heard (one heard per row)."""
    g = torch.Generator().manual_seed(seed)
    iq = torch.randint(-3000, 3000, (B, R, 2, L), generator=g, dtype=torch.int16)
    rx_pos = torch.randn(B, R, 3, generator=g) * 40e3
    rx_state = torch.randint(ABSENT, HEARD + 1, (B, R), generator=g).to(torch.int8)
    rx_state[:, 0] = HEARD
    rx_state[:, 1] = SILENT
    return iq, rx_pos, rx_state


def model(size="tiny", seed=0, receiver_states=3):
    torch.manual_seed(seed)
    m = build_model(ModelConfig(size=size, receiver_states=receiver_states)).eval()
    m.pos_scale_m.fill_(50e3)
    if receiver_states == 3:
        torch.nn.init.normal_(m.silent)  # a trained model's marker is not zero
    return m


def test_stft_matches_torch_stft_with_sign_of_frequency():
    L, n_fft, hop = 256, 32, 16
    t = torch.arange(L, dtype=torch.float64)
    tone = torch.exp(-2j * np.pi * 5 / n_fft * t)  # a negative-frequency tone
    iq = torch.stack([tone.real, tone.imag])[None].float()
    re, im = ComplexSTFT(n_fft, hop)(iq)
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    ref = torch.stft(tone, n_fft, hop, window=window, center=False, return_complex=True) / window.sum()
    ref = torch.fft.fftshift(ref, dim=0)
    assert torch.allclose(re.double()[0], ref.real, atol=1e-5) and torch.allclose(im.double()[0], ref.imag, atol=1e-5)
    power = (re.square() + im.square())[0].mean(-1)
    assert power.argmax().item() == n_fft // 2 - 5  # the energy sits in bin -5, not +5


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_shapes_and_positive_uncertainty(size):
    mean, tril = model(size)(*random_batch())
    assert mean.shape == (5, 2) and tril.shape == (5, 2, 2)
    assert torch.isfinite(mean).all() and (torch.diagonal(tril, dim1=1, dim2=2) > 0).all()
    assert (tril[:, 0, 1] == 0).all()


@pytest.mark.parametrize("states", [3, 2])
def test_absent_receivers_do_not_matter(states):
    m = model(receiver_states=states)
    iq, rx_pos, rx_state = random_batch()
    out = m(iq, rx_pos, rx_state)
    absent = rx_state == ABSENT
    iq2, rx2 = iq.clone(), rx_pos.clone()
    iq2[absent] = 12345
    rx2[absent] = -1e6
    out2 = m(iq2, rx2, rx_state)
    assert torch.allclose(out[0], out2[0], atol=1e-3) and torch.allclose(out[1], out2[1], rtol=1e-5, atol=1e-3)


def test_silent_receivers_inform_a_three_state_model_only():
    """A silent receiver's IQ, position and state reach the estimate of a three-state model; to a
    two-state model (trained before receiver states) silent is absent."""
    iq, rx_pos, rx_state = random_batch()
    as_absent = torch.where(rx_state == SILENT, ABSENT, rx_state).to(torch.int8)
    moved = rx_pos.clone()
    moved[rx_state == SILENT] += 20e3
    three, two = model(), model(receiver_states=2)
    assert not torch.allclose(three(iq, rx_pos, rx_state)[0], three(iq, rx_pos, as_absent)[0])
    assert not torch.allclose(three(iq, rx_pos, rx_state)[0], three(iq, moved, rx_state)[0])
    assert torch.equal(two(iq, rx_pos, rx_state)[0], two(iq, rx_pos, as_absent)[0])
    assert torch.equal(two(iq, rx_pos, rx_state)[0], two(iq, moved, rx_state)[0])


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_absent_receivers_cannot_leak_nan_or_inf(fill):
    m = model()
    iq, rx_pos, rx_state = random_batch()
    want = m(iq, rx_pos, rx_state)
    absent = rx_state == ABSENT
    rx2 = rx_pos.clone()
    rx2[absent] = fill
    iq2 = iq.clone()
    iq2[absent] = -32768
    got = m(iq2, rx2, rx_state)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])  # bit for bit: zeroed before use


def test_a_row_that_no_receiver_hears_is_marked_nan():
    iq, rx_pos, rx_state = random_batch()
    rx_state[2] = SILENT  # online receivers, none hears: no estimate
    mean, tril = model()(iq, rx_pos, rx_state)
    lower = torch.tril(torch.ones(2, 2, dtype=torch.bool))
    assert torch.isnan(mean[2]).all() and torch.isnan(tril[2][lower]).all()
    keep = torch.arange(5) != 2
    assert torch.isfinite(mean[keep]).all() and torch.isfinite(tril[keep]).all()


def test_invariant_to_receiver_order():
    m = model()
    iq, rx_pos, rx_state = random_batch()
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    a = m(iq, rx_pos, rx_state)
    b = m(iq[:, perm], rx_pos[:, perm], rx_state[:, perm])
    assert torch.allclose(a[0], b[0], atol=1e-2) and torch.allclose(a[1], b[1], rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("heard", [1, 2, 7])
def test_any_number_of_receivers_that_hear(heard):
    iq, rx_pos, _ = random_batch()
    rx_state = torch.full((5, 7), SILENT, dtype=torch.int8)
    rx_state[:, :heard] = HEARD
    mean, tril = model()(iq, rx_pos, rx_state)
    assert torch.isfinite(mean).all() and torch.isfinite(tril).all()


def test_same_seed_same_model_and_output():
    batch = random_batch()
    a, b = model(seed=4)(*batch), model(seed=4)(*batch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], model(seed=5)(*batch)[0])


def test_nll_in_metres_matches_torch_distribution():
    mean = torch.tensor([[1000.0, -2000.0]])
    tril = torch.tensor([[[3000.0, 0.0], [500.0, 1500.0]]])
    target = torch.tensor([[2500.0, 100.0]])
    ref = -torch.distributions.MultivariateNormal(mean, scale_tril=tril).log_prob(target)
    assert torch.allclose(gaussian_nll(target, mean, tril), ref, rtol=1e-5)


def test_nan_iq_and_wrong_shape_are_refused():
    cols = {"iq": np.zeros((2, 7, 2, 64), np.float32), "rx_pos": np.zeros((2, 7, 3)), "rx_state": np.full((2, 7), HEARD, np.int8)}
    cols["iq"][1, 3, 0, 5] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values in batch rows \[1\]"):
        to_inputs(cols, 45.0, 8.0)
    cols["iq"] = np.zeros((2, 7, 64), np.int16)
    with pytest.raises(ValueError, match="expected \\(batch, receivers, 2, samples\\)"):
        to_inputs(cols, 45.0, 8.0)


def test_unknown_model_size_is_named():
    with pytest.raises(ValueError, match="model.size 'huge'"):
        build_model(ModelConfig(size="huge"))
