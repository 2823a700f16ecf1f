"""Image references and the vision collator: exact labels, TRL parity, tiny VLM forward/backward.

Tiny LLaVA, Qwen2-VL, Idefics3 and Gemma 3 models and processors are built offline from
configs, on the PIL image processors (no torchvision needed).
"""

from __future__ import annotations

import base64
import http.server
import io
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from newtune.data.images import ImageLimits, load_image
from newtune.data.strategies.base import Conversation
from newtune.data.tokenize import IGNORE_INDEX, Engine
from newtune.data.vision import BASE_DIR_KEY, ORIGIN_KEY, VisionCollator, attach_images
from newtune.errors import DataError

Image = pytest.importorskip("PIL.Image")

_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}IMG"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
)
# ChatML with parts; `{% generation %}` marks what TRL's assistant_only_loss trains.
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}" + _CONTENT + "<|im_end|>"
    "{% endgeneration %}{% else %}" + _CONTENT + "<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _tokenizer(chat_tok_dir: Path, specials: list[str], **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tok_dir, **kwargs)
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def _llava(tok_dir: Path) -> tuple[Any, Any]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor
    from transformers import LlavaForConditionalGeneration as Model
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer(tok_dir, ["<image>"])
    size = {"height": 24, "width": 24}
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size=size),
        tokenizer=tok,
        patch_size=6,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE.replace("IMG", "<image>"),
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=24,
        patch_size=6,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(vocab_size=len(tok), **TINY_TEXT),
        image_token_index=proc.image_token_id,
    )
    return proc, lambda: Model(config)


def _qwen2_vl(tok_dir: Path) -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLProcessor
    from transformers import Qwen2VLForConditionalGeneration as Model
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.processing_utils import ProcessorMixin

    class ImagesOnly(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor, which needs torchvision."""

        def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str) -> None:
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tok = _tokenizer(
        tok_dir, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=3136)
    proc = ImagesOnly(
        image_processor, tok, TEMPLATE.replace("IMG", "<|vision_start|><|image_pad|><|vision_end|>")
    )
    text = dict(vocab_size=len(tok), rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
    config = Qwen2VLConfig(
        text_config={**TINY_TEXT, **text},
        vision_config=vision,
        image_token_id=proc.image_token_id,
        video_token_id=proc.video_token_id,
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
    )
    return proc, lambda: Model(config)


def _idefics3(tok_dir: Path) -> tuple[Any, Any]:
    from transformers import Idefics3Config, Idefics3Processor, LlamaConfig
    from transformers import Idefics3ForConditionalGeneration as Model
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    tok = _tokenizer(tok_dir, specials)
    edge = {"longest_edge": 32}
    image_processor = Idefics3ImageProcessorPil(
        size=edge, max_image_size=edge, do_image_splitting=False
    )
    proc = Idefics3Processor(
        image_processor, tok, image_seq_len=4, chat_template=TEMPLATE.replace("IMG", "<image>")
    )
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(vocab_size=len(tok), **TINY_TEXT),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    return proc, lambda: Model(config)


def _gemma3(tok_dir: Path) -> tuple[Any, Any]:
    from transformers import Gemma3Config, Gemma3Processor
    from transformers import Gemma3ForConditionalGeneration as Model
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    names = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>"}
    tok = _tokenizer(tok_dir, [], extra_special_tokens={**names, "eoi_token": "<end_of_image>"})
    proc = Gemma3Processor(
        Gemma3ImageProcessorPil(size={"height": 16, "width": 16}),
        tok,
        image_seq_length=4,
        chat_template=TEMPLATE.replace("IMG", "<start_of_image>"),
    )
    config = Gemma3Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        text_config={**TINY_TEXT, "vocab_size": len(tok), "head_dim": 8},
        mm_tokens_per_image=4,
        image_token_index=tok.image_token_id,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
    )
    return proc, lambda: Model(config)


FAMILIES = {"llava": _llava, "qwen2_vl": _qwen2_vl, "idefics3": _idefics3, "gemma3": _gemma3}
# Image tokens each processor puts in place of the red (50x40) and the blue (30x30) image.
IMAGE_TOKENS = {"llava": (16, 16), "qwen2_vl": (6, 4), "idefics3": (4, 4), "gemma3": (4, 4)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, chat_tok_dir: Path) -> tuple[str, Any, Any]:
    """(name, processor, model factory) of one tiny VLM family."""
    proc, build = FAMILIES[request.param](chat_tok_dir)
    return request.param, proc, build


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A data folder with red.png (40x50) and blue.png (30x30)."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(_png((255, 0, 0), (50, 40)))
    (tmp_path / "img" / "blue.png").write_bytes(_png((0, 0, 255), (30, 30)))
    return tmp_path


def _rows(images: list[Any]) -> list[dict[str, Any]]:
    """Two rows in TRL's vision format: an image in a multi-turn chat and an image after text."""
    red, blue = images
    user = [{"type": "image"}, {"type": "text", "text": "What colour?"}]
    first = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": "Red"}]},
        {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue, red, green."}]},
    ]
    second = [
        {"role": "system", "content": [{"type": "text", "text": "You are a terse assistant."}]},
        {"role": "user", "content": [{"type": "text", "text": "Translate:"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue"}]},
    ]
    return [{"messages": first, "images": [red]}, {"messages": second, "images": [blue]}]


def _answers_trained(tok: Any, ids: list[int], labels: list[int], answers: list[str]) -> None:
    """Labels are -100 except, after each `<|im_start|>assistant\\n`, the answer and its EOT."""
    head = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    expected = [IGNORE_INDEX] * len(ids)
    at = 0
    for answer in answers:
        at = next(j for j in range(at, len(ids)) if ids[j : j + len(head)] == head) + len(head)
        target = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert ids[at : at + len(target)] == target
        expected[at : at + len(target)] = target
        at += len(target)
    assert labels == expected


def test_labels_exact_and_pixels(family: tuple, image_dir: Path) -> None:
    name, proc, _ = family
    rows = _rows(["img/red.png", "img/blue.png"])
    batch = VisionCollator(proc, base_dir=image_dir)(rows)
    tok = proc.tokenizer
    n = batch["attention_mask"].sum(1).tolist()
    for i, answers in enumerate([["Red", "Blue, red, green."], ["Blue"]]):
        ids, labels = batch["input_ids"][i, : n[i]].tolist(), batch["labels"][i].tolist()
        _answers_trained(tok, ids, labels[: n[i]], answers)
        assert labels[n[i] :] == [IGNORE_INDEX] * (len(labels) - n[i])
        image_id = tok.convert_tokens_to_ids(
            {"gemma3": "<image_soft_token>", "qwen2_vl": "<|image_pad|>"}.get(name, "<image>")
        )
        assert ids.count(image_id) == IMAGE_TOKENS[name][i]
    shapes = {
        "llava": {"pixel_values": (2, 3, 24, 24)},
        "qwen2_vl": {"pixel_values": (40, 1176), "image_grid_thw": (2, 3)},
        "idefics3": {"pixel_values": (2, 1, 3, 32, 32), "pixel_attention_mask": (2, 1, 32, 32)},
        "gemma3": {
            "pixel_values": (2, 3, 16, 16),
            "token_type_ids": tuple(batch["input_ids"].shape),
        },
    }[name]
    for key, shape in shapes.items():
        assert tuple(batch[key].shape) == shape, key
    if name == "qwen2_vl":
        assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4]]


def test_matches_trl_collator(family: tuple, image_dir: Path) -> None:
    """Same input_ids and pixels as TRL 1.16; labels equal its assistant_only_loss labels.

    TRL's default (no assistant_only_loss) trains every token, image placeholders included:
    newtune never trains an image token nor a user turn, by design.
    """
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    name, proc, _ = family
    pil = [load_image(p, "test", image_dir) for p in ("img/red.png", "img/blue.png")]
    ours = VisionCollator(proc, base_dir=image_dir)(_rows(["img/red.png", "img/blue.png"]))
    trl = DataCollatorForVisionLanguageModeling(proc, assistant_only_loss=True)(_rows(pil))
    assert set(trl) == set(ours)
    for key in trl:
        assert torch.equal(ours[key], trl[key]), key
    plain = DataCollatorForVisionLanguageModeling(proc)(_rows(pil))
    assert torch.equal(plain["input_ids"], ours["input_ids"])
    image_positions = torch.isin(ours["input_ids"], torch.tensor(sorted(_image_ids(proc))))
    assert image_positions.sum() >= sum(IMAGE_TOKENS[name])
    assert (plain["labels"][image_positions] == ours["input_ids"][image_positions]).all()
    assert (ours["labels"][image_positions] == IGNORE_INDEX).all()


def _image_ids(proc: Any) -> set[int]:
    """Every token id a processor adds for an image (placeholders, boundaries, tags)."""
    tok = proc.tokenizer
    added = set(tok.get_added_vocab().values())
    text = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<pad>")}
    return added - text - {tok.bos_token_id, tok.eos_token_id}


def test_forward_backward_finite(family: tuple, image_dir: Path) -> None:
    _, proc, build = family
    torch.manual_seed(0)
    model = build()
    batch = VisionCollator(proc, base_dir=image_dir)(_rows(["img/red.png", "img/blue.png"]))
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_text_only_rows_match_text_engine(chat_tok_dir: Path) -> None:
    """A row without images gets the text engine's ids and labels, for each train_on_eos."""
    proc, _ = _llava(chat_tok_dir)
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "Translate to French."},
        {"role": "assistant", "content": "Bleu"},
    ]
    template = TEMPLATE.replace("IMG", "<image>")
    for eos in ("turn", "all", "last", "none"):
        for roles, inputs in ((("assistant",), False), (("assistant", "user"), False), ((), True)):
            engine = Engine(
                proc.tokenizer,
                template,
                roles_to_train=roles,
                train_on_eos=eos,
                train_on_inputs=inputs,
            )
            want = engine.tokenize(Conversation(tuple(messages), train=(None, None, False)))[0]
            collate = VisionCollator(
                proc, roles_to_train=roles, train_on_eos=eos, train_on_inputs=inputs
            )
            got = collate([{"messages": messages, "train": [None, None, False]}])
            assert got["input_ids"][0].tolist() == want.input_ids
            assert got["labels"][0].tolist() == want.labels, (eos, roles)


def test_images_never_trained_with_train_on_inputs(chat_tok_dir: Path, image_dir: Path) -> None:
    proc, _ = _llava(chat_tok_dir)
    row = _rows(["img/red.png", "img/blue.png"])[0]
    batch = VisionCollator(proc, base_dir=image_dir, train_on_inputs=True)([row])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    image = ids == proc.image_token_id
    assert image.sum() == 16 and (labels[image] == IGNORE_INDEX).all()
    question = proc.tokenizer("What colour?", add_special_tokens=False)["input_ids"]
    trained = [t for t in labels.tolist() if t != IGNORE_INDEX]
    assert trained[: len(question)] == question


def test_row_too_long_is_an_error(chat_tok_dir: Path, image_dir: Path) -> None:
    proc, _ = _llava(chat_tok_dir)
    row = {**_rows(["img/red.png", "img/blue.png"])[1], ORIGIN_KEY: "data.jsonl row 7"}
    with pytest.raises(DataError, match=r"data.jsonl row 7 is \d+ tokens .* sequence_len 20"):
        VisionCollator(proc, base_dir=image_dir, max_length=20)([row])


def test_attach_images_trl_rules() -> None:
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Red"}]
    assert attach_images(msgs, ["a.png", "b.png"])[0]["content"] == [
        {"type": "image", "image": "a.png"},
        {"type": "image", "image": "b.png"},
        {"type": "text", "text": "Hi"},
    ]
    assert attach_images(msgs, [])[0]["content"] == "Hi"
    with_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "image", "url": "x"}]}]
    filled = attach_images(with_parts, ["a.png"])[0]["content"]
    assert filled == [{"type": "image", "image": "a.png"}, {"type": "image", "url": "x"}]
    with pytest.raises(DataError, match="2 images in its `images` column but 1 image parts"):
        attach_images(with_parts, ["a.png", "b.png"])


# -- image references ------------------------------------------------------------------------


def test_image_reference_forms(image_dir: Path) -> None:
    data = (image_dir / "img" / "red.png").read_bytes()
    b64 = base64.b64encode(data).decode()
    refs = [
        "img/red.png",
        str(image_dir / "img" / "red.png"),
        (image_dir / "img" / "red.png").as_uri(),
        "data:image/png;base64," + b64,
        b64,
        {"bytes": data, "path": None},
        {"bytes": None, "path": "img/red.png"},
        data,
        Image.open(io.BytesIO(data)),
    ]
    for ref in refs:
        image = load_image(ref, "row 0", image_dir)
        assert (image.mode, image.size, image.getpixel((3, 3))) == ("RGB", (50, 40), (255, 0, 0))


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("img/missing.png", r"row 4: the image img/missing.png \(.*missing.png\) does not exist"),
        ("img", r"row 4: the image img \(.*img\) is not a file"),
        ("notes.txt", r"row 4: notes.txt is not an image Pillow can read"),
        ("data:image/png,abc", "is a data: URI that is not base64"),
        ("data:image/png;base64,@@@", "is not valid base64"),
        ("s3://bucket/x.png", "uses the scheme `s3:`"),
        ({"path": None}, "has neither `bytes` nor `path`"),
        (3, "must be a path, URL, base64 string or image, got int"),
    ],
)
def test_image_reference_errors(image_dir: Path, ref: Any, message: str) -> None:
    (image_dir / "notes.txt").write_text("not an image\n")
    with pytest.raises(DataError, match=message):
        load_image(ref, "row 4", image_dir)


def test_image_limits(image_dir: Path) -> None:
    with pytest.raises(DataError, match=r"is 50x40 pixels; images may have at most 1000 pixels"):
        load_image("img/red.png", "row 1", image_dir, ImageLimits(max_pixels=1000))
    with pytest.raises(DataError, match=r"bytes, over the 10-byte limit"):
        load_image("img/red.png", "row 1", image_dir, ImageLimits(max_bytes=10))
    truncated = (image_dir / "img" / "red.png").read_bytes()[:60]
    with pytest.raises(DataError, match="row 1: .* cannot be decoded"):
        load_image(truncated, "row 1", image_dir)


def test_image_download_bounded(image_dir: Path) -> None:
    body = (image_dir / "img" / "blue.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/blue.png")
                self.end_headers()
                return
            self.send_response(200 if self.path == "/blue.png" else 404)
            self.end_headers()
            self.wfile.write(body if self.path == "/blue.png" else b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for path in ("/blue.png", "/moved"):
            assert load_image(url + path, "row 2").getpixel((0, 0)) == (0, 0, 255)
        with pytest.raises(DataError, match="row 2: the image .*/gone.png cannot be downloaded"):
            load_image(url + "/gone.png", "row 2")
        small = ImageLimits(max_bytes=len(body) - 1)
        with pytest.raises(DataError, match=f"over the {len(body) - 1}-byte limit"):
            load_image(url + "/blue.png", "row 2", limits=small)
    finally:
        server.shutdown()


def test_collator_error_names_row_and_path(chat_tok_dir: Path, image_dir: Path) -> None:
    proc, _ = _llava(chat_tok_dir)
    rows = _rows(["img/red.png", "blue.png"])
    rows[1][BASE_DIR_KEY] = str(image_dir / "img")  # a row's own data folder wins
    assert VisionCollator(proc, base_dir=image_dir)(rows)["pixel_values"].shape[0] == 2
    rows = _rows(["img/red.png", "img/nope.png"])
    rows[1][ORIGIN_KEY] = "train.jsonl row 2"
    with pytest.raises(DataError, match=r"train.jsonl row 2: the image img/nope.png .* not exist"):
        VisionCollator(proc, base_dir=image_dir)(rows)
    bad = {"messages": [{"role": "user", "content": "look: <image>"}]}
    with pytest.raises(DataError, match="batch row 0: the text contains the image token `<image>`"):
        VisionCollator(proc)([bad])
