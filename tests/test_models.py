"""Built-in models: deterministic builds, the one loading path, and a bit-exact S3 round trip."""

from __future__ import annotations

import hashlib

import pytest
import torch

from atelier.errors import InvalidInput, NotFound
from atelier.models import build_model, load_pipeline, resolve_model
from atelier.models.builtin import BUILTIN
from atelier.sampling import SampleRequest, render
from atelier.storage import Storage


def tree_hashes(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"
    }


def test_tiny_is_sd_shaped(tiny_model):
    pipe = load_pipeline(str(tiny_model))
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.unet.config.in_channels == 4
    assert pipe.vae.config.latent_channels == 4
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8  # latents at 1/8 of the side
    image = torch.zeros(1, 3, 64, 64)
    latents = pipe.vae.encode(image).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    size_mb = sum(p.stat().st_size for p in tiny_model.rglob("*") if p.is_file()) / 1e6
    assert size_mb < 30


def test_builds_are_deterministic_from_the_seed(tiny_model, tmp_path):
    again = build_model("tiny", tmp_path / "again", seed=0)
    other = build_model("tiny", tmp_path / "other", seed=1)
    assert tree_hashes(again) == tree_hashes(tiny_model)
    differs = {k for k, v in tree_hashes(other).items() if tree_hashes(tiny_model)[k] != v}
    assert "unet/diffusion_pytorch_model.safetensors" in differs


def test_building_a_model_that_is_already_there_keeps_its_files(tmp_path):
    """Two workers on one machine build the same built-in into the same cache folder: the later
    one keeps what the earlier one wrote (a reader may have it open); another model replaces it."""
    out = build_model("tiny", tmp_path / "tiny")
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    inode = weights.stat().st_ino
    assert build_model("tiny", out) == out and weights.stat().st_ino == inode
    build_model("tiny", out, seed=1)
    assert weights.stat().st_ino != inode
    assert tree_hashes(out) == tree_hashes(build_model("tiny", tmp_path / "seed1", seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed1", "tiny"]  # no leftovers


def _build_on_rank(rank: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_MASTER_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        if rank == 1:  # what a second training worker does when it builds its base model
            build_model("tiny", out)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_a_distributed_worker_other_than_rank_0_builds_a_complete_model(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    from support import free_port

    monkeypatch.setenv("TEST_MASTER_PORT", str(free_port()))
    mp.spawn(_build_on_rank, args=(str(tmp_path / "tiny"),), nprocs=2)
    assert tree_hashes(tmp_path / "tiny") == tree_hashes(build_model("tiny", tmp_path / "here"))


def test_generation_is_deterministic_by_seed(tiny_model):
    pipe = load_pipeline(str(tiny_model))
    req = SampleRequest(model="tiny", prompts=["photo of a ring"], steps=4, out="/dev/null")
    a, b = render(pipe, req.prompts[0], req, 7), render(pipe, req.prompts[0], req, 7)
    c = render(pipe, req.prompts[0], req, 8)
    assert a == b and a != c
    assert a[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_round_trips_bit_exactly_through_s3(settings, tiny_model, tmp_path):
    storage = Storage(settings)
    uri = storage.uri("base-models", "tiny", "test")
    storage.commit(tiny_model, uri, {"kind": "base-model"})
    local = resolve_model(uri, settings=settings, storage=storage)
    assert tree_hashes(tiny_model) == tree_hashes(__import__("pathlib").Path(local))
    original = load_pipeline(str(tiny_model))
    loaded = load_pipeline(uri, settings=settings, storage=storage)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    req = SampleRequest(model=uri, prompts=["photo of a ring"], steps=3, out="/dev/null")
    assert render(original, "photo of a ring", req, 0) == render(loaded, "photo of a ring", req, 0)


def test_builtin_names_resolve_through_the_cache(settings):
    first = resolve_model("tiny", settings=settings)
    assert first.startswith(str(settings.cache_dir))
    assert resolve_model("tiny", settings=settings) == first


def test_model_references_are_checked(tmp_path, settings):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(InvalidInput, match="model_index.json"):
        resolve_model(str(tmp_path / "not-a-model"), settings=settings)
    with pytest.raises(NotFound, match="unknown model"):
        resolve_model("no such model", settings=settings)
    assert resolve_model("stabilityai/stable-diffusion-2-1-base", settings=settings) == (
        "stabilityai/stable-diffusion-2-1-base"
    )
    with pytest.raises(InvalidInput, match="unknown built-in"):
        build_model("sd99", tmp_path / "x")


@pytest.mark.parametrize("name", ["sd15", "sd21-base"])
def test_published_architectures_have_their_parameter_counts(name):
    # Built on the meta device: the real shapes without allocating ~1 GB of random weights.
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**BUILTIN[name].unet)
    n = sum(p.numel() for p in unet.parameters())
    expected = {"sd15": 859_520_964, "sd21-base": 865_910_724}[name]
    assert n == expected
