"""Bulk jobs over videos (belm_kernels.bulk): folders of frames and video files (PyAV) inverted
with the tiny Wan pipeline (9 frames of 32x32, 4 steps), regenerated bit for bit in one process
and under torchrun (2 ranks write the bytes of one process), a progress bar counting frames, the
other tiny video families through generate -> invert -> regenerate, and every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
av = pytest.importorskip("av")
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from belm_kernels import bulk  # noqa: E402
from belm_kernels.cli import main  # noqa: E402
from belm_kernels.diffusers import tiny_wan_pipeline, video_latents  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FRAMES, SIZE = 9, 32
RUN = ["--model", "tiny-wan", "--steps", "4", "--guidance", "3.0", "--negative-prompt", "blurry",
       "--no-progress"]
IDS = ["frames0", "frames1", "lossless", "h264"]


def frames(seed: int, n: int = FRAMES, size: int = SIZE) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def write_frames(folder: Path, pixels) -> Path:
    folder.mkdir(parents=True)
    for k, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"{k:05d}.png")
    return folder


def write_video(path: Path, pixels, codec: str = "ffv1") -> Path:
    """A video file: FFV1 (lossless RGB) in .mkv, or H.264 in .mp4."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height = pixels[0].shape[1], pixels[0].shape[0]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for p in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(p, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_videos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_frames(folder / "frames0", frames(0))
    write_frames(folder / "frames1", frames(1))
    write_video(folder / "lossless.mkv", frames(2))
    write_video(folder / "h264.mp4", frames(3), codec="libx264")
    for i in IDS:
        (folder / f"{i}.txt").write_text(f"a video of {i}")
    return folder


def stored(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("run.json", "summary.json")}


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def torchrun(nproc: int, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "belm_kernels.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return make_videos(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def pairs(videos, tmp_path_factory):
    """One process, in this interpreter: the pairs the other runs are compared with."""
    out = tmp_path_factory.mktemp("ref") / "pairs"
    assert main(["invert-dataset", "--data", str(videos), "--out", str(out), "--shards", "3",
                 *RUN]) == 0
    return out


def clean_latents(videos: Path) -> dict[str, torch.Tensor]:
    """The clean latents of each input video, encoded here (one thread, as the jobs ran)."""
    pipe = tiny_wan_pipeline()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the encoder's bits depend on the thread count
        sources = {"frames0": videos / "frames0", "frames1": videos / "frames1",
                   "lossless": videos / "lossless.mkv", "h264": videos / "h264.mp4"}
        return {i: video_latents(pipe, bulk.read_video(path)) for i, path in sources.items()}
    finally:
        torch.set_num_threads(threads)


def test_video_pairs_are_stored_with_the_videos_fingerprints(pairs, videos):
    s = summary(pairs)
    assert (s["items"], s["done"], s["failed"]) == (4, 4, 0)
    tensors = stored(pairs)
    assert tensors["frames0/x_T"].shape == (1, 16, 3, 4, 4)
    assert tensors["lossless/state_T"].dtype == torch.float64
    cfg = json.loads((pairs / "run.json").read_text())["config"]
    assert cfg["pipeline"] == "WanPipeline" and cfg["num_frames"] == FRAMES
    assert (cfg["height"], cfg["width"]) == (SIZE, SIZE)
    unipc = tiny_wan_pipeline().scheduler  # Wan's UniPC: the grid's sigmas and integer steps
    unipc.set_timesteps(4)
    assert cfg["grid"]["timesteps"] == unipc.timesteps.tolist() == [999, 900, 750, 500]
    _, meta = bulk.read_shard(bulk.shard_path(pairs, bulk.shard_of("lossless", 3), 3))
    rec = next(r for r in meta["items"] if r["id"] == "lossless")
    assert rec["fingerprint"]["video_sha256"] == bulk.media.video_sha256(videos / "lossless.mkv")


def test_regeneration_gives_back_the_video_latents_exactly(pairs, videos, tmp_path):
    out = tmp_path / "regenerated"
    assert main(["regenerate-dataset", "--pairs", str(pairs), "--out", str(out),
                 "--no-progress"]) == 0
    tensors = stored(out)
    for i, x0 in clean_latents(videos).items():
        assert torch.equal(tensors[f"{i}/latents"], x0), i
    # the regenerated videos are folders of PNG frames with their prompts, invertible as they are
    assert sorted(p.name for p in (out / "videos" / "frames0").iterdir()) == [
        f"{k:05d}.png" for k in range(FRAMES)]
    assert (out / "videos" / "h264.txt").read_text() == "a video of h264"
    again = tmp_path / "again"
    assert main(["invert-dataset", "--data", str(out / "videos"), "--out", str(again),
                 *RUN]) == 0
    assert summary(again)["done"] == 4


def test_two_ranks_write_the_bytes_of_one_process(videos, pairs, tmp_path):
    out = tmp_path / "pairs-2"
    res = torchrun(2, "invert-dataset", "--data", videos, "--out", out, "--shards", "3", *RUN)
    assert res.returncode == 0, res.stderr[-3000:]
    assert outputs(out) == outputs(pairs)
    regenerated = tmp_path / "regenerated-2"
    res = torchrun(2, "regenerate-dataset", "--pairs", out, "--out", regenerated,
                   "--save", "latents", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    tensors = stored(regenerated)
    for i, x0 in clean_latents(videos).items():
        assert torch.equal(tensors[f"{i}/latents"], x0), i


def test_progress_bar_counts_frames(videos, tmp_path, capsys):
    out = tmp_path / "out"
    run = [a for a in RUN if a != "--no-progress"]
    assert main(["invert-dataset", "--data", str(videos), "--out", str(out), *run]) == 0
    err = capsys.readouterr().err
    assert f"{4 * FRAMES}/{4 * FRAMES}" in err and "frame/s" in err


@pytest.mark.parametrize("model,size,frames", [("tiny-wan2.2", 32, 9),
                                               ("tiny-hunyuan-video", 16, 9),
                                               ("tiny-ltx", 32, 9), ("tiny-cogvideox", 16, 9)])
def test_other_video_families_generate_invert_and_regenerate_exactly(model, size, frames,
                                                                       tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    run = ["--model", model, "--steps", "4", "--guidance", "3.0", "--no-progress"]
    generated, pairs, back = tmp_path / "gen", tmp_path / "pairs", tmp_path / "back"
    assert main(["generate-dataset", "--prompts", str(prompts), "--out", str(generated),
                 "--save", "latents,videos", *run]) == 0
    clip = generated / "videos" / "000001"
    assert len(list(clip.glob("*.png"))) == frames
    assert Image.open(clip / "00000.png").size == (size, size)
    assert main(["invert-dataset", "--data", str(generated / "videos"), "--out", str(pairs),
                 *run]) == 0
    assert main(["regenerate-dataset", "--pairs", str(pairs), "--out", str(back),
                 "--save", "latents", "--no-progress"]) == 0
    # the latents of the generated (then saved as 8-bit PNG) video, inverted and regenerated
    from belm_kernels.bulk.jobs import load_pipeline

    pipe, _ = load_pipeline(model, torch.float32, torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        x0 = video_latents(pipe, bulk.read_video(clip))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(stored(back)["000001/latents"], x0)


# ------------------------------------------------------------------ bad input


def test_bad_videos_are_reported_and_the_others_go_on(tmp_path, capsys):
    data = tmp_path / "data"
    write_frames(data / "good", frames(0))
    write_frames(data / "short", frames(1, n=5))
    write_frames(data / "small", frames(2, size=16))
    data_bytes = write_video(data / "whole.mkv", frames(3)).read_bytes()
    (data / "truncated.mkv").write_bytes(data_bytes[: len(data_bytes) // 2])
    (data / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    write_frames(data / "empty", [])
    for i in ("good", "short", "small", "truncated", "corrupt", "empty", "whole"):
        (data / f"{i}.txt").write_text(f"a video of {i}")
    out = tmp_path / "out"
    assert main(["invert-dataset", "--data", str(data), "--out", str(out), *RUN]) == 1
    err = capsys.readouterr().err
    s = summary(out)
    assert s["done"] == 2 and s["failed"] == 5  # good and whole
    failed = {f["id"]: f["error"] for f in s["failures"]}
    assert "has 5 frames, this run inverts 9" in failed["short"]
    assert "is 16x16 (WxH), this run inverts 32x32: resize it, or pass --resize" in failed["small"]
    assert "frames (a truncated file?), this run inverts 9" in failed["truncated"]
    assert failed["corrupt"].startswith(f"cannot read video {data / 'corrupt.mp4'}: ")
    assert "frame folder" in failed["empty"] and "holds no images" in failed["empty"]
    assert "FAILED item 'short'" in err
    # --resize takes the small one; the frame count cannot be resized
    assert main(["invert-dataset", "--data", str(data), "--out", str(tmp_path / "resized"),
                 "--resize", *RUN]) == 1
    assert "small" not in {f["id"] for f in summary(tmp_path / "resized")["failures"]}


def test_images_for_a_video_pipeline_and_the_reverse(videos, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(frames(0)[0]).save(images / "a.png")
    (images / "a.txt").write_text("a cat")
    out = tmp_path / "out"
    assert main(["invert-dataset", "--data", str(images), "--out", str(out), *RUN]) == 2
    assert ("no videos (folders of frames, or files .mp4, .mkv, .webm, .avi, .mov) in this "
            "folder; it holds images, but WanPipeline makes videos") in capsys.readouterr().err
    assert main(["invert-dataset", "--data", str(videos), "--out", str(out), "--model", "tiny",
                 "--no-progress"]) == 2
    assert "it holds videos, but StableDiffusionPipeline makes images" in \
        capsys.readouterr().err
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "x", "image": "images/a.png", "prompt": "a cat"}))
    assert main(["invert-dataset", "--data", str(manifest), "--out", str(out), *RUN]) == 2
    assert ("no 'video' field (expected id, video, prompt): WanPipeline makes videos, not "
            "images") in capsys.readouterr().err
    manifest.write_text(json.dumps({"id": "x", "video": "images/a.png", "prompt": "a cat"}))
    assert main(["invert-dataset", "--data", str(manifest), "--out", str(out), *RUN]) == 1
    assert "is an image, not a video" in summary(out)["failures"][0]["error"]
    assert not (tmp_path / "never").exists()
    for args, message in [(["--model", "tiny", "--frames", "9"],
                           "--frames 9: StableDiffusionPipeline makes images"),
                          (["--model", "tiny-wan", "--save", "images"],
                           "WanPipeline makes videos, not images")]:
        prompts = tmp_path / "p.txt"
        prompts.write_text("a fox\n")
        assert main(["generate-dataset", "--prompts", str(prompts), "--out",
                     str(tmp_path / "never"), "--no-progress", *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_a_folder_of_another_family_or_a_short_zero_snr_grid_is_refused(pairs, videos, tmp_path,
                                                                        capsys):
    run = [a if a != "tiny-wan" else "tiny-hunyuan-video" for a in RUN]
    assert main(["invert-dataset", "--data", str(videos), "--out", str(pairs), *run,
                 "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert "holds results made with another config" in err and "tiny-hunyuan-video" in err
    out = tmp_path / "cog"
    assert main(["invert-dataset", "--data", str(videos), "--out", str(out), "--model",
                 "tiny-cogvideox", "--steps", "2", "--no-progress"]) == 2
    assert "needs at least 3 steps" in capsys.readouterr().err and not out.exists()


def test_conditioned_pipelines_are_refused(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "WanImageToVideoPipeline"}')
    assert main(["invert-dataset", "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--model", str(model), "--no-progress"]) == 2
    assert "is a WanImageToVideoPipeline; the bulk commands support" in capsys.readouterr().err


def test_readme_wan_commands_run_as_written(tmp_path, monkeypatch):
    """The README's bulk commands for tiny-wan (with its prompts.txt), in a fresh folder: the
    regeneration under torchrun gives back the generated videos' latents bit for bit."""
    import re
    import shlex

    section = (ROOT / "README.md").read_text().split("## Bulk jobs")[1].split("\n## ")[0]
    code = re.sub(r"\\\n\s*", "", "\n".join(line[4:] for line in section.splitlines()
                                            if line.startswith("    ")))
    commands = [c for c in code.splitlines() if c.startswith("printf") or "demo/wan" in c]
    assert len(commands) == 4 and commands[3].startswith("torchrun")
    monkeypatch.chdir(tmp_path)
    subprocess.run(commands[0], shell=True, check=True)
    for command in commands[1:3]:
        program, *args = shlex.split(command)
        assert program == "belm-kernels" and main(args) == 0, command
    _, *args = shlex.split(commands[3])
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert summary(Path("demo/wan-regenerated"))["done"] == 4
    pipe = tiny_wan_pipeline()
    threads = torch.get_num_threads()
    regenerated = stored(Path("demo/wan-regenerated"))
    try:
        torch.set_num_threads(1)
        for clip in sorted(Path("demo/wan/videos").iterdir()):
            if clip.is_dir():
                x0 = video_latents(pipe, bulk.read_video(clip))
                assert torch.equal(regenerated[f"{clip.name}/latents"], x0), clip.name
    finally:
        torch.set_num_threads(threads)
