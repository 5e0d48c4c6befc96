"""LoRA and textual-inversion weights survive save and reload bit-exactly, and change the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atelier.errors import IntegrityError, InvalidInput, NotFound
from atelier.models import adapters, load_pipeline

PROMPT = "photo of a ring"
TOKEN = "<sks>"


def image(pipe, prompt=PROMPT):
    return pipe(prompt, num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def lora_states(pipe, adapter="default"):
    from peft.utils import get_peft_model_state_dict

    return {role: get_peft_model_state_dict(getattr(pipe, role), adapter_name=adapter)
            for role in ("unet", "text_encoder")}


def lora_pipeline(tiny_model, seed=0, alpha=8):
    """The tiny model with a wide rank-4 LoRA on UNet and text encoder, weights made non-zero
    (LoRA B starts at zero: an untrained adapter would change nothing)."""
    pipe = load_pipeline(str(tiny_model))
    adapters.add_lora(pipe.unet, rank=4, alpha=alpha, wide=True, text_encoder=pipe.text_encoder)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return pipe


def ti_pipeline(tiny_model, token=TOKEN, seed=0):
    """The tiny model with `token` added and given a random embedding."""
    pipe = load_pipeline(str(tiny_model))
    assert pipe.tokenizer.add_tokens([token]) == 1
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    row = pipe.tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        weight = pipe.text_encoder.get_input_embeddings().weight
        weight[row] = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(seed))
    return pipe


def embedding(pipe, token):
    return pipe.text_encoder.get_input_embeddings().weight[
        pipe.tokenizer.convert_tokens_to_ids(token)].detach().clone()


def test_wide_target_set_extends_the_attention_projections():
    attention = adapters.lora_target_modules()
    wide = adapters.lora_target_modules(wide=True)
    assert attention == ["to_q", "to_k", "to_v", "to_out.0"]
    assert wide[:4] == attention and {"conv1", "conv2", "ff.net.2", "proj_in"} <= set(wide)


def test_wide_lora_reloads_bit_exactly_on_a_fresh_base(tiny_model, tmp_path):
    base = image(load_pipeline(str(tiny_model)))
    trained = lora_pipeline(tiny_model)
    before = lora_states(trained)
    # The adapter covers attention and conv/ff layers: the set where the conversion trap bites.
    assert any(".to_q." in k for k in before["unet"]) and any(".conv1." in k for k in before["unet"])
    expected = image(trained)

    folder = adapters.save_lora(trained.unet, tmp_path / "lora", text_encoder=trained.text_encoder)
    assert (folder / adapters.LORA_WEIGHTS).is_file()
    fresh = load_pipeline(str(tiny_model))
    name = adapters.apply_lora(fresh, folder)
    after = lora_states(fresh, name)

    for role in ("unet", "text_encoder"):
        assert after[role].keys() == before[role].keys(), role
        assert all(torch.equal(after[role][k], before[role][k]) for k in before[role]), role
    assert fresh.unet.peft_config[name].lora_alpha == 8  # alpha != rank survives the file
    reloaded = image(fresh)
    assert np.array_equal(reloaded, expected)
    assert not np.array_equal(reloaded, base)


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_a_lora_saved_through_the_diffusers_conversion_is_refused(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    trained = lora_pipeline(tiny_model)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "converted",
        unet_lora_layers=convert_state_dict_to_diffusers(lora_states(trained)["unet"]),
        safe_serialization=True,
    )
    with pytest.raises(IntegrityError, match="unet LoRA tensors loaded"):
        adapters.apply_lora(load_pipeline(str(tiny_model)), tmp_path / "converted")


def test_textual_inversion_reloads_bit_exactly_on_a_fresh_base(tiny_model, tmp_path):
    prompt = f"photo of a {TOKEN} ring"
    base = image(load_pipeline(str(tiny_model)), prompt)
    trained = ti_pipeline(tiny_model)
    expected = image(trained, prompt)

    folder = adapters.save_textual_inversion(trained.text_encoder, trained.tokenizer, TOKEN,
                                             tmp_path / "ti")
    assert list(adapters.embedding_files(folder)) == [TOKEN]
    fresh = load_pipeline(str(tiny_model))
    assert adapters.apply_textual_inversion(fresh, folder, TOKEN) == [TOKEN]

    assert fresh.tokenizer.convert_tokens_to_ids(TOKEN) == trained.tokenizer.convert_tokens_to_ids(TOKEN)
    assert torch.equal(embedding(fresh, TOKEN), embedding(trained, TOKEN))
    reloaded = image(fresh, prompt)
    assert np.array_equal(reloaded, expected)
    assert not np.array_equal(reloaded, base)
    with pytest.raises(InvalidInput, match="cannot add token"):
        adapters.apply_textual_inversion(fresh, folder)


def test_joint_textual_inversion_folders_load_every_token(tiny_model, tmp_path):
    pipe = load_pipeline(str(tiny_model))
    pipe.tokenizer.add_tokens(["<aa>", "<bb>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[-2:] = torch.randn(2, 32)
    for token, sub in (("<aa>", "aa"), ("<bb>", "bb")):
        adapters.save_textual_inversion(pipe.text_encoder, pipe.tokenizer, token, tmp_path / sub)
    fresh = load_pipeline(str(tiny_model))
    assert sorted(adapters.apply_textual_inversion(fresh, tmp_path)) == ["<aa>", "<bb>"]
    for token in ("<aa>", "<bb>"):
        assert torch.equal(embedding(fresh, token), embedding(pipe, token))
    with pytest.raises(InvalidInput, match="single embedding"):
        adapters.apply_textual_inversion(load_pipeline(str(tiny_model)), tmp_path, "<x>")


def test_folders_without_weights_are_not_adapters(tiny_model, tmp_path):
    pipe = load_pipeline(str(tiny_model))
    with pytest.raises(NotFound, match="not a LoRA folder"):
        adapters.apply_lora(pipe, tmp_path)
    with pytest.raises(NotFound, match="not a textual-inversion folder"):
        adapters.apply_textual_inversion(pipe, tmp_path)
    with pytest.raises(InvalidInput, match="not in the tokenizer"):
        adapters.save_textual_inversion(pipe.text_encoder, pipe.tokenizer, "<nope>", tmp_path / "x")
