"""The pipeline on CUDA, as users run it: half precision, Triton kernels, every call replayed from CUDA graphs,
against the float32 reference path on the CPU with the same weights and seeds. Uses the shipped demo model."""

import numpy as np
import pytest
import torch

from tritonsd import kernels
from tritonsd.engine.pipeline import Pipeline
from tritonsd.engine.samplers import SAMPLERS
from tritonsd.loader import DEMO_MODEL

pytestmark = [
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="the demo model is not installed in this copy"),
    # The graphs' first capture compiles kernels in parallel; falling back to one by one is an error here.
    pytest.mark.filterwarnings("error:parallel kernel compilation failed"),
]

MIN_PSNR = 35.0


@pytest.fixture(scope="module")
def reference():
    return Pipeline.from_checkpoint(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def gpu():
    return Pipeline.from_checkpoint(device="cuda", dtype=torch.float16)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-20)))


def compare(reference, gpu, call: str, *args, **kwargs) -> None:
    with kernels.backend("torch"):
        want = getattr(reference, call)(*args, output_type="np", **kwargs)
    with kernels.backend("auto"):
        got = getattr(gpu, call)(*args, output_type="np", **kwargs)
    value = psnr(got, want)
    assert value >= MIN_PSNR, f"{call} {kwargs}: PSNR {value:.1f} dB against the float32 reference path < {MIN_PSNR}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_txt2img_matches_reference_path(reference, gpu, sampler):
    compare(reference, gpu, "txt2img", ["a red circle on a blue background", "a yellow square"], steps=12,
            sampler=sampler, seed=3, guidance_scale=7.5)


def test_graphs_are_reused_across_calls_and_read_new_inputs(reference, gpu):
    """A second call with another guidance scale, seed and prompt replays the graphs captured by the first."""
    args = dict(steps=8, sampler="euler", batch_size=2)
    compare(reference, gpu, "txt2img", "a green triangle", seed=5, guidance_scale=7.5, **args)
    captured = len(gpu._graphs.graphs)
    compare(reference, gpu, "txt2img", "a white circle on a black background", seed=6, guidance_scale=3.0, **args)
    assert len(gpu._graphs.graphs) == captured, "a call with the same shapes captured new graphs"


def test_unguided_and_other_sizes(reference, gpu):
    compare(reference, gpu, "txt2img", "a blue square", steps=10, seed=8, guidance_scale=1.0, width=96, height=48)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_img2img_matches_reference_path(reference, gpu, sampler):
    image = reference.txt2img("a red square on a white background", steps=10, seed=1, output_type="np")[0]
    compare(reference, gpu, "img2img", image, "a red circle on a white background", strength=0.6, steps=10,
            sampler=sampler, seed=2)


def test_returned_latents_are_not_overwritten_by_the_next_call(gpu):
    with kernels.backend("auto"):
        first = gpu.txt2img("a red circle", steps=4, seed=0, output_type="latent")
        kept = first.clone()
        gpu.txt2img("a blue square", steps=4, seed=1, output_type="latent")
    assert torch.equal(first, kept), "a later call wrote into latents returned earlier"


def demo_lora(path):
    """A random kohya LoRA over the demo UNet's cross-attention and the text encoder's MLP, strong enough to show."""
    import safetensors.torch

    model = Pipeline.from_checkpoint(device="cpu").model
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, w in model.state_dict().items():
        if name.endswith(("attn2.to_q.weight", "attn2.to_out.0.weight", "mlp.fc1.weight")):
            key = ("lora_unet_" if name.startswith("unet.") else "lora_te_text_model_") + \
                name.split(".", 1)[1].removesuffix(".weight").replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) / w.shape[1] ** 0.5
            tensors[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g)
    safetensors.torch.save_file(tensors, path)


def test_lora_switches_under_captured_graphs_without_recapture(reference, gpu, tmp_path):
    """Load, re-scale and unload write the weights in place: the graphs captured before replay the new weights,
    no graph is captured again, and unloading gives back the image from before bit for bit."""
    path = tmp_path / "demo-lora.safetensors"
    demo_lora(path)
    args = dict(steps=8, sampler="euler", seed=4, guidance_scale=7.5)
    with kernels.backend("auto"):
        before = gpu.txt2img("a red circle", output_type="np", **args)
    captured = len(gpu._graphs.graphs)
    for scale in (1.0, 0.4):
        reference.load_lora(path, scale=scale)
        gpu.load_lora(path, scale=scale)
        try:
            compare(reference, gpu, "txt2img", "a red circle", **args)
            with kernels.backend("auto"):
                changed = psnr(gpu.txt2img("a red circle", output_type="np", **args), before)
            assert changed < 30, f"the LoRA at {scale} hardly changes the image (PSNR {changed:.1f} dB to before)"
        finally:
            reference.unload_lora()
            gpu.unload_lora()
    assert len(gpu._graphs.graphs) == captured, "switching LoRAs captured new graphs"
    with kernels.backend("auto"):
        after = gpu.txt2img("a red circle", output_type="np", **args)
    assert np.array_equal(before, after), "the image after unloading differs from the one before loading"


def test_long_weighted_prompts_and_their_graphs(reference, gpu):
    """A 2-chunk prompt adds one step graph (its context is twice as long) and reuses the text-encoder graph, which
    encodes one chunk position at a time."""
    def captured(kind: str) -> list:
        return [signature for (name, signature) in gpu._graphs.graphs if name[0] == kind]

    args = dict(steps=6, sampler="euler", seed=4)
    compare(reference, gpu, "txt2img", "a red circle on a blue background", **args)
    steps, texts = captured("step"), captured("text")
    long = "a (red:1.3) circle, " + ", ".join(["on a blue background"] * 20) + " BREAK [blurry]"
    compare(reference, gpu, "txt2img", long, negative_prompt="(green:0.8)", **args)
    assert len(captured("step")) == len(steps) + 1, "a 2-chunk prompt should add exactly one step graph"
    assert captured("text") == texts, "the text-encoder graph was captured again for a longer prompt"


def test_textual_inversion_loaded_after_capture_is_read(reference, gpu, tmp_path):
    """Loading an embedding replaces the vector table that a captured text-encoder graph read; the next call must
    read the new one."""
    compare(reference, gpu, "txt2img", "tsdtest on a blue background", steps=4, seed=2)  # captures the text graph
    hidden = reference.config.text.hidden_size
    for n in (2, 3):
        path = tmp_path / f"v{n}" / "tsdtest.pt"
        path.parent.mkdir()
        torch.save({"string_to_param": {"*": torch.randn(n, hidden)}}, path)
        reference.load_textual_inversion(path)
        gpu.load_textual_inversion(path)
        compare(reference, gpu, "txt2img", "tsdtest on a blue background", steps=4, seed=2)
