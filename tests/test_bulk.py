"""Bulk jobs (belm_kernels.bulk): one process and torchrun ranks write the same bytes, a killed run
resumes with another number of ranks, regeneration from the stored pairs is exact, bad input is
reported item by item. The tiny offline pipeline, 32x32 images, 4 steps, CPU (gloo); the tiny
SD3 and Flux (rectified-flow) pipelines, 16x16 images, through the same commands."""

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from belm_kernels import bulk  # noqa: E402
from belm_kernels.cli import main  # noqa: E402
from belm_kernels.diffusers import (  # noqa: E402
    image_latents,
    tiny_flux_pipeline,
    tiny_stable_diffusion_3_pipeline,
    tiny_stable_diffusion_pipeline,
    tiny_stable_diffusion_xl_pipeline,
)
from belm_kernels.schedule import calculate_shift  # noqa: E402

N_ITEMS, SHARDS = 8, 5  # ids img0..img7 fill all 5 shards (1 or 2 items each)
RUN = ["--steps", "4", "--guidance", "3.0", "--negative-prompt", "blurry", "--no-progress"]
ROOT = Path(__file__).resolve().parent.parent


def make_images(folder: Path, ids, size=32, seed=0, prompts=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in ids:
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        if prompts:
            (folder / f"{i}.txt").write_text(f"a photo of {i}")
    return folder


def outputs(folder: Path) -> dict[str, bytes]:
    """Every result file of an output folder (shards and images), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("run.json", "summary.json")}


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def stored(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        part = load_file(path)
        assert not set(part) & set(tensors), "an item stored twice"
        tensors.update(part)
    return tensors


def torchrun(nproc: int, *args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "belm_kernels.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data"), [f"img{i}" for i in range(N_ITEMS)])


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process, in this interpreter: the pairs every other run is compared with."""
    out = tmp_path_factory.mktemp("ref") / "pairs"
    assert main(["invert-dataset", "--data", str(data), "--out", str(out), "--shards",
                 str(SHARDS), *RUN]) == 0
    return out


@pytest.fixture(scope="module")
def pipe():
    return tiny_stable_diffusion_pipeline()


def test_reference_run_stores_every_item_once_with_its_metadata(reference):
    s = summary(reference)
    assert (s["items"], s["done"], s["skipped"], s["failed"]) == (N_ITEMS, N_ITEMS, 0, 0)
    assert s["world_size"] == 1 and s["threads"] == 1 and s["shards_written"] == SHARDS
    tensors = stored(reference)
    assert sorted(tensors) == sorted(f"img{i}/{n}" for i in range(N_ITEMS)
                                     for n in ("x_T", "x_T2", "state_T", "state_T2"))
    assert tensors["img0/x_T"].dtype == torch.float32
    assert tensors["img0/state_T"].dtype == torch.float64
    run = json.loads((reference / "run.json").read_text())
    cfg = run["config"]
    assert run["num_shards"] == SHARDS and run["command"] == "invert-dataset"
    assert cfg["model"] == bulk.tiny_record("tiny") and cfg["pipeline"] == "StableDiffusionPipeline"
    assert cfg["grid"]["timesteps"] == [751, 501, 251, 1] and cfg["steps"] == 4
    assert cfg["grid"]["kind"].startswith("variance-preserving")
    assert len(cfg["grid"]["alphas_cumprod"]) == 4
    assert cfg["guidance_scale"] == 3.0 and cfg["dtype"] == "float32" and cfg["method"] == "obelm"
    assert cfg["scheduler"]["_class_name"] == "DDIMScheduler"
    assert (cfg["height"], cfg["width"]) == (32, 32)
    path = bulk.shard_path(reference, bulk.shard_of("img3", SHARDS), SHARDS)
    _, meta = bulk.read_shard(path)
    rec = {r["id"]: r for r in meta["items"]}["img3"]
    assert meta["config"] == cfg and rec["fingerprint"]["prompt"] == "a photo of img3"
    assert rec["fingerprint"]["negative_prompt"] == "blurry"
    assert len(rec["fingerprint"]["image_sha256"]) == 64
    # a SHA-256 of every tensor (dtype, shape, bytes) and of the record itself
    assert rec["tensors"] == {n: bulk.tensor_sha256(tensors[f"img3/{n}"])
                              for n in ("state_T", "state_T2", "x_T", "x_T2")}
    assert rec["files"] == {} and rec["sha256"] == bulk.record_sha256(rec)


def test_shard_of_is_a_fixed_function_of_the_id():
    # Folders written earlier depend on these values: changing the hash breaks every resume.
    assert [bulk.shard_of(f"img{i}", SHARDS) for i in range(N_ITEMS)] == [2, 1, 4, 0, 2, 3, 1, 3]
    assert bulk.shard_of("a", 1000) == 250 and bulk.shard_of("cat", 1000) == 259


def test_deal_gives_the_largest_shards_to_the_least_loaded_rank():
    assert bulk.runner._deal([(0, 3), (1, 1), (2, 2), (3, 2)], 2) == [[0, 1], [2, 3]]
    assert bulk.runner._deal([(4, 1)], 3) == [[4], [], []]


@pytest.mark.slow  # torchrun: two fresh interpreters importing torch and diffusers (~20 s here)
def test_two_ranks_write_the_bytes_of_one_process(data, reference, tmp_path):
    out = tmp_path / "pairs"
    res = torchrun(2, "invert-dataset", "--data", data, "--out", out, "--shards", SHARDS, *RUN)
    assert res.returncode == 0, res.stderr
    assert outputs(out) == outputs(reference)
    s = summary(out)
    assert (s["world_size"], s["done"], s["skipped"], s["failed"]) == (2, N_ITEMS, 0, 0)
    assert f"invert-dataset: {N_ITEMS} items: {N_ITEMS} done" in res.stdout


@pytest.mark.slow  # torchrun, as above
def test_rank_that_dies_then_resume_with_one_process(data, reference, tmp_path, capsys):
    out = tmp_path / "pairs"
    res = torchrun(2, "invert-dataset", "--data", data, "--out", out, "--shards", SHARDS, *RUN,
                   env={bulk.EXIT_HOOK: "1:1"})
    assert res.returncode != 0  # torchrun reports the dead rank and stops the others
    assert f"{bulk.EXIT_HOOK}: exiting after 1 shards" in res.stderr
    left = sorted(out.glob("shard-*.safetensors"))
    assert 1 <= len(left) < SHARDS
    finished = sum(len(bulk.read_shard(p)[1]["items"]) for p in left)
    assert main(["invert-dataset", "--data", str(data), "--out", str(out), *RUN]) == 0
    s = summary(out)
    assert (s["skipped"], s["done"], s["failed"]) == (finished, N_ITEMS - finished, 0)
    assert s["world_size"] == 1 and s["shards_written"] == SHARDS - len(left)
    assert outputs(out) == outputs(reference)  # nothing lost, nothing twice, no temp file left


def assert_inputs_come_back(data, regen, pipe, ids):
    """The regenerated latents are the image latents that were inverted, bit for bit."""
    latents = stored(regen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the jobs ran: the encoder's bits depend on the thread count
    try:
        for i in ids:
            x0 = image_latents(pipe, Image.open(data / f"{i}.png").convert("RGB"))
            assert torch.equal(latents[f"{i}/latents"], x0), i
    finally:
        torch.set_num_threads(threads)


def test_regeneration_gives_back_the_input_latents_exactly(data, reference, tmp_path, pipe):
    out = tmp_path / "regen"
    assert main(["regenerate-dataset", "--pairs", str(reference), "--out", str(out),
                 "--no-progress"]) == 0
    assert summary(out)["done"] == N_ITEMS
    assert_inputs_come_back(data, out, pipe, [f"img{i}" for i in range(N_ITEMS)])
    for i in range(N_ITEMS):
        assert (out / "images" / f"img{i}.png").is_file()
        assert (out / "images" / f"img{i}.txt").read_text() == f"a photo of img{i}"
    # a rerun finds everything done
    assert main(["regenerate-dataset", "--pairs", str(reference), "--out", str(out),
                 "--no-progress"]) == 0
    assert (summary(out)["done"], summary(out)["skipped"]) == (0, N_ITEMS)


def test_sdxl_pipeline_inverts_and_regenerates_exactly(tmp_path):
    data = make_images(tmp_path / "data", ["a", "b"])
    pairs, regen = tmp_path / "pairs", tmp_path / "regen"
    assert main(["invert-dataset", "--data", str(data), "--out", str(pairs), "--model",
                 "tiny-sdxl", *RUN]) == 0
    cfg = json.loads((pairs / "run.json").read_text())["config"]
    assert cfg["pipeline"] == "StableDiffusionXLPipeline"
    assert cfg["model"] == bulk.tiny_record("tiny-sdxl")
    assert main(["regenerate-dataset", "--pairs", str(pairs), "--out", str(regen), "--save",
                 "latents", "--no-progress"]) == 0
    assert_inputs_come_back(data, regen, tiny_stable_diffusion_xl_pipeline(), ["a", "b"])


FLOW = {"tiny-sd3": tiny_stable_diffusion_3_pipeline, "tiny-flux": tiny_flux_pipeline}


@pytest.fixture(scope="module", params=sorted(FLOW))
def flow_run(request, tmp_path_factory):
    """A rectified-flow model: generate-dataset of two prompts, then invert-dataset of its
    images (16x16, the tiny pipelines' default size). (model, folder with gen/ and pairs/)."""
    model, root = request.param, tmp_path_factory.mktemp(request.param)
    (root / "prompts.txt").write_text("a red fox\na blue car\n")
    assert main(["generate-dataset", "--prompts", str(root / "prompts.txt"), "--out",
                 str(root / "gen"), "--model", model, "--steps", "3", "--save", "images,latents",
                 "--no-progress"]) == 0
    assert main(["invert-dataset", "--data", str(root / "gen" / "images"), "--out",
                 str(root / "pairs"), "--model", model, *RUN]) == 0
    return model, root


def test_flow_pipelines_generate_invert_and_regenerate_exactly(flow_run, tmp_path):
    model, root = flow_run
    pipe = FLOW[model]()
    gen = json.loads((root / "gen" / "run.json").read_text())["config"]
    latents = stored(root / "gen")["000001/latents"]
    # Flux latents are packed: (batch, 16 tokens of 2x2 patches, 16 = 4 channels x 4)
    assert latents.shape == ((1, 16, 16) if model == "tiny-flux" else (1, 4, 8, 8))
    assert Image.open(root / "gen" / "images" / "000002.png").size == (16, 16)
    cfg = json.loads((root / "pairs" / "run.json").read_text())["config"]
    assert cfg["pipeline"] == type(pipe).__name__ and cfg["model"] == bulk.tiny_record(model)
    assert (cfg["height"], cfg["width"]) == (16, 16) and gen["grid"]["kind"] == cfg["grid"]["kind"]
    grid = cfg["grid"]  # the full record the pairs carry: sigmas, and for Flux mu
    assert grid["kind"].startswith("rectified-flow") and grid["sigmas"][-1] == 0.0
    assert len(grid["sigmas"]) == 5 and len(grid["timesteps"]) == 4
    # Flux: mu from the image's 16 packed tokens; SD3's static shift uses none
    assert grid["mu"] == (calculate_shift(16) if model == "tiny-flux" else None)
    out = tmp_path / "regen"
    assert main(["regenerate-dataset", "--pairs", str(root / "pairs"), "--out", str(out),
                 "--no-progress"]) == 0
    assert summary(out)["done"] == 2 and (out / "images" / "000001.png").is_file()
    assert_inputs_come_back(root / "gen" / "images", out, pipe, ["000001", "000002"])


def test_flow_folders_on_another_grid_are_refused(flow_run, tmp_path, monkeypatch, capsys):
    model, root = flow_run
    # invert-dataset into the folder at another size: another grid (for Flux another mu)
    images = ["--data", str(root / "gen" / "images"), "--model", model, *RUN]
    assert main(["invert-dataset", "--out", str(root / "pairs"), *images, "--size", "32",
                 "--resize"]) == 2
    err = capsys.readouterr().err
    assert "height: 16 there, 32 in this run" in err
    if model == "tiny-flux":  # mu from the image size; SD3's grid does not depend on it
        assert f"grid.mu: {calculate_shift(16)} there, {calculate_shift(64)} in this run" in err
    else:
        assert "grid." not in err
    pairs = tmp_path / "pairs"
    shutil.copytree(root / "pairs", pairs)
    run = json.loads((pairs / "run.json").read_text())
    run["config"]["grid"]["sigmas"][1] += 1e-9  # pairs made on (slightly) other sigmas
    (pairs / "run.json").write_text(json.dumps(run))
    out = tmp_path / "regen"
    regen = ["regenerate-dataset", "--pairs", str(pairs), "--out", str(out), "--no-progress"]
    assert main(regen) == 2 and not out.exists()  # the job refuses before any work
    assert "the pairs were made on another grid than their config gives here (sigmas: [" in (
        capsys.readouterr().err)
    # past that check, the scheduler's own check of the pair's grid refuses every item
    monkeypatch.setattr(bulk.jobs, "_grid", lambda *args: run["config"]["grid"])
    assert main(regen) == 1
    s = summary(out)
    assert s["failed"] == 2 and all("the latent pair was made on the sigmas [1.0, 0." in f["error"]
                                    for f in s["failures"])


@pytest.mark.parametrize("old", ["belm-kernels bulk 1", "belm-kernels bulk 2"])
def test_folder_of_a_previous_format_is_refused(reference, tmp_path, capsys, old):
    """Format 1 recorded only the timesteps of the grid, format 2 no SHA-256 of the stored
    tensors: such folders are refused, not misread."""
    pairs = tmp_path / "pairs"
    shutil.copytree(reference, pairs)
    run = json.loads((pairs / "run.json").read_text())
    run["format"] = old
    (pairs / "run.json").write_text(json.dumps(run))
    assert main(["regenerate-dataset", "--pairs", str(pairs), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    assert (f"is not a run record of this version of the tool ({bulk.FORMAT}; it has "
            f"{old!r})") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_saved_flow_pipeline_folders_work_as_model(tmp_path):
    """--model DIR of a saved tiny SD3 / Flux pipeline: its default size survives save and load
    (a loaded FluxPipeline's default_sample_size is a constant 128, 256 px here)."""
    data = make_images(tmp_path / "data", ["a"], size=16)
    for name, make in FLOW.items():
        folder = tmp_path / name
        make().save_pretrained(folder)
        pipe, record = bulk.load_pipeline(str(folder), torch.float32, torch.device("cpu"))
        assert record == str(folder.resolve()) and bulk.default_size(pipe) == (16, 16)
        out = tmp_path / f"{name}-pairs"
        assert main(["invert-dataset", "--data", str(data), "--out", str(out), "--model",
                     str(folder), *RUN]) == 0
        assert summary(out)["done"] == 1


def test_readme_flux_commands_run_as_written(tmp_path, monkeypatch):
    """The README's bulk commands for tiny-flux (with its prompts.txt), in a fresh folder."""
    section = (ROOT / "README.md").read_text().split("## Bulk jobs")[1].split("\n## ")[0]
    code = re.sub(r"\\\n\s*", "", "\n".join(line[4:] for line in section.splitlines()
                                            if line.startswith("    ")))
    commands = [c for c in code.splitlines() if c.startswith("printf") or "demo/flux" in c]
    assert len(commands) == 4 and "--model tiny-flux" in commands[1]
    monkeypatch.chdir(tmp_path)
    subprocess.run(commands[0], shell=True, check=True)
    for command in commands[1:]:
        program, *args = shlex.split(command)
        assert program == "belm-kernels" and main(args) == 0, command
        assert summary(Path(args[args.index("--out") + 1]))["done"] == 4
    ids = [p.stem for p in sorted(Path("demo/flux/images").glob("*.png"))]
    assert_inputs_come_back(Path("demo/flux/images"), Path("demo/flux-regenerated"),
                            tiny_flux_pipeline(), ids)


def test_unreadable_pairs_shard_is_reported_and_the_others_regenerate(reference, tmp_path):
    pairs = tmp_path / "pairs"
    shutil.copytree(reference, pairs)
    victim = bulk.shard_path(pairs, 1, SHARDS)  # img1 and img6
    victim.write_bytes(b"garbage")
    out = tmp_path / "regen"
    assert main(["regenerate-dataset", "--pairs", str(pairs), "--out", str(out), "--save",
                 "latents", "--no-progress"]) == 1
    s = summary(out)
    assert (s["done"], s["failed"]) == (N_ITEMS - 2, 1)
    assert str(victim) in s["failures"][0]["error"] and "unreadable" in s["failures"][0]["error"]
    assert sorted(k.split("/")[0] for k in stored(out)) == sorted(
        f"img{i}" for i in range(N_ITEMS) if i not in (1, 6))


def flip_byte(path: Path, key: str | None = None) -> None:
    """Flip one bit in the middle of tensor ``key``'s bytes in a safetensors file (it stays
    readable), or in the middle of the file if ``key`` is None."""
    data = bytearray(path.read_bytes())
    if key is None:
        at = len(data) // 2
    else:
        n = int.from_bytes(data[:8], "little")
        begin, end = json.loads(data[8:8 + n])[key]["data_offsets"]
        at = 8 + n + (begin + end) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupted_pair_is_refused_by_regenerate_and_redone_on_resume(data, reference, tmp_path,
                                                                       pipe, capsys):
    """One payload bit of a finished shard flipped: regeneration refuses that item naming its
    shard (it used to drift silently), and a resumed invert-dataset redoes it (it used to skip
    it as done), after which regeneration is exact again."""
    pairs = tmp_path / "pairs"
    shutil.copytree(reference, pairs)
    shard = bulk.shard_of("img1", SHARDS)
    victim = bulk.shard_path(pairs, shard, SHARDS)
    flip_byte(victim, "img1/state_T2")
    assert bulk.read_shard(victim)  # still a readable shard
    out = tmp_path / "regen"
    regen = ["regenerate-dataset", "--pairs", str(pairs), "--out", str(out), "--save", "latents",
             "--no-progress"]
    assert main(regen) == 1
    s = summary(out)
    assert (s["done"], s["failed"]) == (N_ITEMS - 1, 1) and s["failures"][0]["id"] == "img1"
    assert (f"the stored pair in {victim} fails verification (tensor 'state_T2' does not match "
            "its SHA-256 (corrupted)): refusing it; run invert-dataset into") in (
        s["failures"][0]["error"])
    assert main(["invert-dataset", "--data", str(data), "--out", str(pairs), *RUN]) == 0
    s = summary(pairs)
    assert (s["done"], s["skipped"], s["failed"]) == (1, N_ITEMS - 1, 0)
    assert s["untrusted"] == [{"shard": shard, "id": "img1", "problem": (
        f"shard file {victim.name}, item 'img1': tensor 'state_T2' does not match its SHA-256 "
        "(corrupted): computed again")}]
    printed = capsys.readouterr()
    assert f"NOT TRUSTED: shard file {victim.name}, item 'img1'" in printed.err
    assert "1 stored result(s) failing verification computed again" in printed.out
    assert outputs(pairs) == outputs(reference)  # redone to the same bytes
    assert main(regen) == 0 and (summary(out)["done"], summary(out)["skipped"]) == (1, N_ITEMS - 1)
    assert_inputs_come_back(data, out, pipe, ["img1"])


def test_tampered_record_is_refused_by_regenerate(reference, tmp_path):
    """A record whose text changed but still parses (here its stored prompt, which regeneration
    uses) fails its own SHA-256."""
    pairs = tmp_path / "pairs"
    shutil.copytree(reference, pairs)
    path = bulk.shard_path(pairs, bulk.shard_of("img3", SHARDS), SHARDS)
    tensors, meta = bulk.read_shard(path)
    next(r for r in meta["items"] if r["id"] == "img3")["fingerprint"]["prompt"] = "a dog"
    bulk.write_shard(path, tensors, meta)
    out = tmp_path / "regen"
    assert main(["regenerate-dataset", "--pairs", str(pairs), "--out", str(out), "--save",
                 "latents", "--no-progress"]) == 1
    s = summary(out)
    assert [f["id"] for f in s["failures"]] == ["img3"] and s["done"] == N_ITEMS - 1
    assert "fails verification (its record does not match its SHA-256)" in s["failures"][0]["error"]


def test_corrupted_stored_image_is_redone(tmp_path):
    """generate-dataset's images carry a SHA-256 too: a changed image (same size, so the old
    size check passed it) is made again on resume, to the same bytes."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue car\n")
    args = ["generate-dataset", "--prompts", str(prompts), "--out", str(tmp_path / "gen"),
            "--steps", "2", "--no-progress"]
    assert main(args) == 0
    before = outputs(tmp_path / "gen")
    image = tmp_path / "gen" / "images" / "000001.png"
    flip_byte(image)
    assert main(args) == 0
    s = summary(tmp_path / "gen")
    assert (s["done"], s["skipped"]) == (1, 1) and [u["id"] for u in s["untrusted"]] == ["000001"]
    assert "file images/000001.png does not match its SHA-256" in s["untrusted"][0]["problem"]
    assert outputs(tmp_path / "gen") == before


def test_tensor_sha256_covers_dtype_shape_and_bytes():
    t = torch.arange(8, dtype=torch.float32)
    digests = {bulk.tensor_sha256(x) for x in (t, t.reshape(2, 4), t.view(torch.int32), t[::2],
                                               t.to(torch.bfloat16), t.to(torch.float64))}
    assert len(digests) == 6
    assert bulk.tensor_sha256(t.reshape(4, 2).t()) == bulk.tensor_sha256(t.reshape(4, 2).t()
                                                                         .contiguous())


def test_edit_with_new_prompts(reference, tmp_path):
    edits = tmp_path / "edits.jsonl"
    edits.write_text('{"id": "img1", "prompt": "a photo of a dog"}\n'
                     '{"id": "nope", "prompt": "a photo of a dog"}\n')
    out = tmp_path / "edit"
    assert main(["regenerate-dataset", "--pairs", str(reference), "--out", str(out), "--prompts",
                 str(edits), "--save", "latents", "--no-progress"]) == 1
    s = summary(out)
    assert (s["done"], s["failed"]) == (1, 1)
    assert s["failures"][0]["id"] == "nope" and "no stored pair" in s["failures"][0]["error"]
    assert not (out / "images").exists()
    same = tmp_path / "same"
    assert main(["regenerate-dataset", "--pairs", str(reference), "--out", str(same),
                 "--save", "latents", "--no-progress"]) == 0
    edited, regenerated = stored(out)["img1/latents"], stored(same)["img1/latents"]
    assert edited.shape == regenerated.shape and not torch.equal(edited, regenerated)
    # another edit prompt into the same folder would overwrite the first edit: refused
    assert main(["regenerate-dataset", "--pairs", str(reference), "--out", str(same),
                 "--prompt", "a cat", "--save", "latents", "--no-progress"]) == 2


def test_generation_is_seeded_per_item(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\na red fox\n")  # ids 000001 and 000003
    args = ["--prompts", str(prompts), "--steps", "3", "--save", "images,latents", "--no-progress"]
    assert main(["generate-dataset", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["generate-dataset", "--out", str(tmp_path / "b"), "--shards", "2", *args]) == 0
    a, b = outputs(tmp_path / "a"), outputs(tmp_path / "b")
    assert sorted(k for k in a if k.startswith("images/")) == [
        "images/000001.png", "images/000001.txt", "images/000003.png", "images/000003.txt"]
    assert {k: v for k, v in a.items() if k.startswith("images/")} == {
        k: v for k, v in b.items() if k.startswith("images/")}  # reproducible
    latents = stored(tmp_path / "a")
    assert latents["000001/latents"].shape == (1, 4, 16, 16)
    assert not torch.equal(latents["000001/latents"], latents["000003/latents"])  # own seeds


def test_bad_items_are_reported_and_the_others_go_on(tmp_path, capsys):
    data = make_images(tmp_path / "data", ["good", "big"], prompts=False)
    make_images(data, ["big"], size=40, seed=1, prompts=False)
    make_images(data, ["noprompt"], seed=2, prompts=False)
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"id": "good", "image": "data/good.png", "prompt": "a photo"},
        {"id": "corrupt", "image": "data/corrupt.png", "prompt": "a photo"},
        {"id": "big", "image": "data/big.png", "prompt": "a photo"},
        {"id": "noprompt", "image": "data/noprompt.png"},
        {"id": "ghost", "image": "data/ghost.png", "prompt": "a photo"}]) + "\n")
    out = tmp_path / "pairs"
    args = ["invert-dataset", "--data", str(manifest), "--out", str(out), *RUN]
    assert main(args) == 1
    s = summary(out)
    assert (s["done"], s["failed"]) == (1, 4)
    errors = {f["id"]: f["error"] for f in s["failures"]}
    assert "cannot read image" in errors["corrupt"] and "corrupt.png" in errors["corrupt"]
    assert "is 40x40 (WxH), this run inverts 32x32" in errors["big"]
    assert "--resize" in errors["big"]
    assert "missing prompt" in errors["noprompt"] and "items.jsonl line 4" in errors["noprompt"]
    assert "cannot read image" in errors["ghost"] and "ghost.png" in errors["ghost"]
    printed = capsys.readouterr()
    assert "FAILED item 'big'" in printed.err and "4 failed" in printed.out
    assert list(stored(out)) == ["good/state_T", "good/state_T2", "good/x_T", "good/x_T2"]
    # fixed input: only the fixed items are computed; the bad ones fail again
    good = stored(out)
    manifest.write_text(manifest.read_text().replace('"data/noprompt.png"}',
                                                     '"data/noprompt.png", "prompt": "a photo"}'))
    assert main(args) == 1
    s = summary(out)
    assert (s["done"], s["skipped"], s["failed"]) == (1, 1, 3)
    after = stored(out)
    assert all(torch.equal(after[k], v) for k, v in good.items()) and "noprompt/x_T" in after
    # --resize is part of the config: the folder refuses it; a new folder takes every image
    assert main([*args, "--resize"]) == 2
    assert main([*args[:-len(RUN) - 1], str(tmp_path / "resized"), *RUN, "--resize"]) == 1
    failed = sorted(f["id"] for f in summary(tmp_path / "resized")["failures"])
    assert failed == ["corrupt", "ghost"]


def test_unsupported_pipeline_fails_before_any_work(data, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    out = tmp_path / "out"
    assert main(["invert-dataset", "--data", str(data), "--out", str(out), "--model", str(model),
                 *RUN]) == 2
    err = capsys.readouterr().err
    assert ("is a DDPMPipeline; the bulk commands support StableDiffusionPipeline, "
            "StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline, ChromaPipeline, "
            "QwenImagePipeline, WanPipeline, HunyuanVideoPipeline, LTXPipeline, "
            "CogVideoXPipeline and their subclasses") in err
    assert not out.exists()
    assert main(["invert-dataset", "--data", str(data), "--out", str(out), "--model",
                 str(tmp_path), *RUN]) == 2
    assert "not a diffusers pipeline folder (no model_index.json)" in capsys.readouterr().err
    assert not out.exists()


def test_folder_of_another_model_grid_or_shard_count_is_refused(data, reference, tmp_path,
                                                                  pipe, capsys):
    before = outputs(reference)
    base = ["invert-dataset", "--data", str(data), "--out", str(reference)]
    assert main([*base, "--steps", "5", "--guidance", "3.0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "steps: 4 there, 5 in this run" in err
    assert "grid.timesteps: [751, 501, 251, 1] there, [801, 601, 401, 201, 1] in this run" in err
    assert "use another --out folder, or delete" in err
    assert main([*base, *RUN, "--shards", "7"]) == 2
    assert "split into 5 shards" in capsys.readouterr().err
    model = tmp_path / "model"
    pipe.save_pretrained(model)  # the same weights, but another model as far as the folder knows
    assert main([*base, *RUN, "--model", str(model)]) == 2
    assert f"model: {json.dumps(bulk.tiny_record('tiny'))} there" in capsys.readouterr().err
    assert outputs(reference) == before
    # the saved folder works as --model
    one = make_images(tmp_path / "one", [])
    shutil.copy(data / "img2.png", one)
    shutil.copy(data / "img2.txt", one)
    out = tmp_path / "pairs"
    assert main(["invert-dataset", "--data", str(one), "--out", str(out), *RUN, "--model",
                 str(model)]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["model"] == str(model.resolve())
    assert summary(out)["done"] == 1 and stored(out)["img2/state_T"].shape == (1, 4, 16, 16)


def test_disk_full_while_writing_a_shard(data, reference, tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    shutil.copytree(reference, out)
    more = tmp_path / "data"
    shutil.copytree(data, more)
    make_images(more, ["new0", "new1"], seed=7)
    before = outputs(out)
    real = bulk.shards._write_bytes

    def full_disk(f, payload):
        if "shard-" not in f.name:
            return real(f, payload)
        f.write(payload[: len(payload) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(bulk.shards, "_write_bytes", full_disk)
    args = ["invert-dataset", "--data", str(more), "--out", str(out), *RUN]
    assert main(args) == 1
    s = summary(out)
    assert (s["done"], s["skipped"], s["failed"]) == (0, N_ITEMS, 2)
    assert sorted(f["id"] for f in s["failures"]) == ["new0", "new1"]
    assert all("No space left on device" in f["error"] for f in s["failures"])
    assert outputs(out) == before  # old shards intact, no partial temp file left
    monkeypatch.undo()
    assert main(args) == 0
    assert (summary(out)["done"], summary(out)["skipped"]) == (2, N_ITEMS)
    tensors, ref = stored(out), stored(reference)
    assert all(torch.equal(tensors[k], v) for k, v in ref.items()) and "new1/x_T" in tensors


def test_unreadable_shard_and_stale_temp_file_are_redone(data, reference, tmp_path, capsys):
    out = tmp_path / "pairs"
    shutil.copytree(reference, out)
    victim = bulk.shard_path(out, 1, SHARDS)
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    (out / f".{victim.name}.tmp-12345").write_bytes(b"left by a killed process")
    assert main(["invert-dataset", "--data", str(data), "--out", str(out), *RUN]) == 0
    assert "is unreadable" in capsys.readouterr().err
    s = summary(out)
    assert (s["done"], s["skipped"], s["shards_written"]) == (2, N_ITEMS - 2, 1)
    assert outputs(out) == outputs(reference)


# ------------------------------------------------------------------ image modes

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
LEVELS = (0.0, 0.25, 0.75, 1.0)  # the gray of each quarter of a test image's width (no ties)


def mode_image(mode: str, size: int = 32):
    """A size x size image in ``mode`` whose vertical quarters hold the grays LEVELS, in the
    mode's own range: 0..65535 for 16-bit and I, 0..1 for F, 0..255 for 8-bit modes."""
    level = np.repeat(np.array(LEVELS), size // 4)[None, :].repeat(size, 0)
    if mode in SIXTEEN_BIT + ("I",):
        wide = np.rint(level * 65535)
        if mode == "I":
            return Image.fromarray(wide.astype(np.int32))
        order = {"I;16B": ">u2", "I;16N": "=u2"}.get(mode, "<u2")
        return Image.frombytes(mode, (size, size), wide.astype(order).tobytes())
    if mode == "F":
        return Image.fromarray(level.astype(np.float32))
    if mode == "1":
        return Image.fromarray(level >= 0.5)
    gray = Image.fromarray(np.rint(level * 255).astype(np.uint8)).convert("RGB")
    if mode in ("P", "PA"):
        gray = gray.convert("P", palette=Image.Palette.ADAPTIVE)  # exact grays
    elif "A" in mode or "a" in mode:
        gray = gray.convert("RGBA")
    return gray.convert(mode)


def written_images(folder: Path) -> list[tuple[str, str, Path]]:
    """(format, mode, file) for every format PIL both writes and opens and every mode it can write
    in that format (some writers convert: the file holds what PIL wrote)."""
    import warnings

    Image.init()
    found = []
    for fmt in sorted(set(Image.SAVE) & set(Image.OPEN)):
        for mode in sorted(Image.MODES):
            path = folder / f"{fmt}-{mode.replace(';', '_')}.img"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mode_image(mode).save(path, format=fmt)
                with Image.open(path) as im:
                    np.asarray(im)
            except Exception:  # PIL cannot write (or read back) this mode in this format
                path.unlink(missing_ok=True)
                continue
            found.append((fmt, mode, path))
    return found


def expected_rgb(path: Path):
    """What read_rgb must give for a file: PIL's own conversion for 8-bit modes (as before); the
    16-bit grays (I;16*, and I from PNG / PPM) times 255/65535 and float grays in 0..1 times 255,
    rounded half up; None where it must fail (I of other formats, F outside 0..1)."""
    with Image.open(path) as im:
        mode, fmt, raw = im.mode, im.format, np.asarray(im)
        if mode not in SIXTEEN_BIT + ("I", "F"):
            return np.asarray(im.convert("RGB"))
    if mode == "F":
        if not (raw.min() >= 0 and raw.max() <= 1):
            return None
        gray = np.floor(raw.astype(np.float64) * 255 + 0.5)
    elif mode == "I" and fmt not in ("PNG", "PPM"):
        return None
    else:
        gray = (raw.astype(np.int64) * 255 + 32767) // 65535
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # PIL's IM format
def test_every_mode_pil_writes_is_read_with_its_content_or_refused(tmp_path):
    """read_rgb on every (format, mode) PIL can write and open: 8-bit RGB with the content kept,
    or a ValueError naming the file. (PIL's own convert('RGB') clips 16-bit and float images to
    255: an almost white 16-bit PNG used to become white.)"""
    found = written_images(tmp_path)
    stored = set()
    for fmt, mode, path in found:
        with Image.open(path) as im:
            stored.add((im.format, im.mode))
        want = expected_rgb(path)
        if want is None:
            with pytest.raises(ValueError, match=re.escape(str(path))):
                bulk.read_rgb(path)
            continue
        got = bulk.read_rgb(path)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), want), (fmt, mode)
    # what this covers (a newer PIL may write more): every mode PIL stores in a file
    assert {m for _, m in stored} >= {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr",
                                      "LAB", "I", "I;16", "I;16B", "F"}
    assert {("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B"), ("PPM", "I"), ("TIFF", "I"),
            ("TIFF", "F")} <= stored
    # the 16-bit and float files hold their grays: none of them reads as clipped
    for fmt, mode in [("PNG", "I;16"), ("TIFF", "I;16B"), ("PPM", "I"), ("TIFF", "F")]:
        path = next(p for f, m, p in found if (f, m) == (fmt, mode))
        quarters = np.asarray(bulk.read_rgb(path))[0, ::8, 0]
        assert quarters.tolist() == [0, 64, 191, 255], (fmt, mode)


def test_refused_image_modes_say_why(tmp_path):
    for name, image, match in [
            ("wide.tiff", mode_image("I"), r"\(TIFF, mode I: 32-bit or signed integers\) has "
                                           "no defined range to scale to 8 bits"),
            ("bright.tiff", Image.fromarray(np.full((4, 4), 2.0, np.float32)),
             r"\(TIFF, mode F\) holds float values in \[2.0, 2.0\]; float images are read as "
             "0..1"),
            ("nan.tiff", Image.fromarray(np.full((4, 4), np.nan, np.float32)), "mode F"),
    ]:
        image.save(tmp_path / name)
        with pytest.raises(ValueError, match=match):
            bulk.read_rgb(tmp_path / name)


def test_16_bit_image_inverts_as_its_8_bit_scaling(tmp_path):
    """An almost white 16-bit PNG is inverted as the 8-bit image of its grays scaled to 0..255,
    bit for bit (it used to be clipped to white, and the run exited 0); a float image out of 0..1
    fails with a message and the other items go on."""
    rng = np.random.default_rng(3)
    wide = rng.integers(56000, 65536, (32, 32), dtype=np.uint16)
    (tmp_path / "d").mkdir()
    Image.fromarray(wide).save(tmp_path / "d" / "wide.png")
    narrow = ((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    Image.fromarray(narrow).convert("RGB").save(tmp_path / "d" / "narrow.png")
    Image.fromarray(np.full((32, 32), 300.0, np.float32)).save(tmp_path / "d" / "float.tiff")
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"d/{n}", "prompt": "a photo"}) + "\n"
                                for n in ("wide.png", "narrow.png", "float.tiff")))
    out = tmp_path / "pairs"
    assert main(["invert-dataset", "--data", str(manifest), "--out", str(out), *RUN]) == 1
    s = summary(out)
    assert s["done"] == 2 and [f["id"] for f in s["failures"]] == ["float"]
    assert "holds float values in [300.0, 300.0]" in s["failures"][0]["error"]
    pairs = stored(out)
    for name in ("x_T", "x_T2", "state_T", "state_T2"):
        assert torch.equal(pairs[f"wide/{name}"], pairs[f"narrow/{name}"]), name


def test_manifests_and_folders_read_the_same_items(tmp_path):
    data = make_images(tmp_path / "d", ["a", "b"])
    (tmp_path / "m.csv").write_text("id,image,prompt\na,d/a.png,a photo of a\n"
                                    "b,d/b.png,a photo of b\n")
    (tmp_path / "m.jsonl").write_text(
        '{"image": "d/a.png", "prompt": "a photo of a"}\n\n'
        '{"id": "b", "image": "d/b.png", "prompt": "a photo of b"}\n')
    key = [(i.id, i.prompt, i.image.resolve()) for i in bulk.read_image_items(data)]
    for manifest in ("m.csv", "m.jsonl"):
        items = bulk.read_image_items(tmp_path / manifest)
        assert [(i.id, i.prompt, i.image.resolve()) for i in items] == key


@pytest.mark.parametrize("text, match", [
    ('{"id": "a", "image": "x.png"}\n{"id": "a", "image": "y.png"}\n', "duplicated: 'a'"),
    ('{"id": "a", "image": "x.png"}\nnot json\n', "line 2: not valid JSON"),
    ('{"id": "a", "prompt": "p"}\n', "line 1: no 'image' field"),
    ('{"id": "../a", "image": "x.png"}\n', "bad item id '../a'"),
])
def test_malformed_manifest_fails_before_any_work(tmp_path, text, match, capsys):
    (tmp_path / "m.jsonl").write_text(text)
    with pytest.raises(bulk.BulkError, match=match):
        bulk.read_image_items(tmp_path / "m.jsonl")
    assert main(["invert-dataset", "--data", str(tmp_path / "m.jsonl"), "--out",
                 str(tmp_path / "out"), *RUN]) == 2
    assert match.split(":")[0] in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_one_step_inversion_is_refused(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["invert-dataset", "--data", str(data), "--out", str(out), "--steps", "1",
                 "--no-progress"]) == 2
    assert "--steps must be at least 2" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("args", [["--size", "0"], ["--size", "3x4x5"], ["--shards", "0"],
                                  ["--threads", "-1"]])
def test_bad_options(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["invert-dataset", "--data", "d", "--out", "o", *args])
    assert exc.value.code == 2 and "error: argument --" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["regenerate-dataset", "--pairs", "p", "--out", "o", "--save", "pixels"])
