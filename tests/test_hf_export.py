"""Exports as Hugging Face model folders: AutoConfig / AutoModel / AutoTokenizer after `import jepa4rec_dist`, raw
item dicts to the same vectors `jepa4rec embed` writes, exact round trips, older exports upgraded, and tokenizers
that do not fit the weights refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jepa4rec_dist.cli import main
from jepa4rec_dist.config import load_config
from jepa4rec_dist.train.pretrain import pretrain

TINY = [Path("configs/model/tiny.yaml")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export(uneven_dataset, tmp_path_factory):
    root, _ = uneven_dataset
    out = tmp_path_factory.mktemp("hf") / "pre"
    cfg = load_config(TINY, [f"--data.out_dir={root}", f"--train.output_dir={out}", "--train.max_steps=2",
                             "--loader.batch_size=4", "--loader.num_workers=0", "--train.lr=1e-3"])
    return Path(pretrain(cfg, progress=False)["export"]), root


def _raw_items(root: Path) -> tuple[list[str], list[dict]]:
    table = pq.read_table(root / "items.parquet", columns=["item_id", "attributes"])
    return table.column("item_id").to_pylist(), table.column("attributes").to_pylist()


def test_export_folder_loads_through_the_auto_classes_and_matches_embed(export, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder, root = export
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in folder.iterdir()}
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "jepa4rec" and config.item_text["attributes"] == ["title", "brand"]
    model = AutoModel.from_pretrained(folder)
    assert type(model).__name__ == "Jepa4RecModel" and model.config.hidden_size == 32
    assert AutoTokenizer.from_pretrained(folder).is_fast
    ids, attrs = _raw_items(root)
    vectors = model.encode_items(attrs).numpy()
    # what `jepa4rec embed` writes for the prepared catalogue: the same vectors, to 1e-5
    assert main(["embed", "--config", str(TINY[0]), "--data", str(root), "--model", str(folder),
                 "--out", str(tmp_path / "emb.parquet")]) == 0
    emb = pq.read_table(tmp_path / "emb.parquet")
    assert emb.column("item_id").to_pylist() == ids
    np.testing.assert_allclose(vectors, np.stack(emb.column("embedding").to_numpy(zero_copy_only=False)), atol=1e-5)
    # a history of raw items: the vector the recommender scores with (prepared path: SequenceEncoder + represent)
    from jepa4rec_dist.data.collate import SequenceEncoder, pad_batch
    from jepa4rec_dist.eval.run import dataset
    from jepa4rec_dist.model import build_encoder

    cfg = load_config(TINY, [f"--data.out_dir={root}", f"--model.init_from={folder}"])
    _, tok, table = dataset(cfg)
    encoder = build_encoder(cfg.model, tok, with_head=False)[0].eval()
    history = [3, 1, 7]
    batch = pad_batch([SequenceEncoder(table, tok, cfg.sequence).history(history)], tok, cfg.sequence,
                      cfg.sequence.max_items, prefix="history_")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(encoder.represent(batch, "history_"), dim=-1)
    got = model.encode_histories([[attrs[i] for i in history]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_auto_model_in_a_fresh_process(export):
    folder, _ = export
    code = ("import jepa4rec_dist\nfrom transformers import AutoModel\n"
            f"m = AutoModel.from_pretrained({str(folder)!r})\n"
            "v = m.encode_items([{'title': 'a brand-new lamp', 'brand': 'brand9'}])\n"
            "print(type(m).__name__, tuple(v.shape), round(float(v.norm()), 4))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Jepa4RecModel (1, 32) 1.0" in done.stdout, done.stdout


def test_save_pretrained_round_trip_is_exact_and_still_an_export(export, tmp_path):
    from transformers import AutoModel

    from jepa4rec_dist.model.checkpoint import load_export

    folder, _ = export
    model = AutoModel.from_pretrained(folder)
    model.save_pretrained(tmp_path / "copy")
    again = AutoModel.from_pretrained(tmp_path / "copy")
    assert model.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(a, again.state_dict()[k]) for k, a in model.state_dict().items())
    cfg, pad_id, tensors, meta = load_export(tmp_path / "copy")  # our own loader reads the HF-written folder
    original = load_export(folder)
    assert cfg == original[0] and pad_id == original[1] and meta["item_text"] == original[3]["item_text"]
    assert all(torch.equal(tensors[k], original[2][k]) for k in tensors)


def test_older_export_gets_a_clear_message_then_upgrades_in_place(export, tmp_path, capsys):
    import shutil

    from transformers import AutoConfig, AutoModel

    folder, root = export
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    meta = json.loads((old / "config.json").read_text())
    for key in ("model_type", "architectures", "pad_token_id", "item_text", "sequence"):
        meta.pop(key)
    (old / "config.json").write_text(json.dumps(meta))
    for f in old.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            f.unlink()
    from jepa4rec_dist.hf import Jepa4RecConfig

    with pytest.raises(ValueError, match="jepa4rec upgrade-export"):
        Jepa4RecConfig.from_pretrained(old)
    with pytest.raises(ValueError):  # transformers' own "Unrecognized model" for AutoConfig
        AutoConfig.from_pretrained(old)
    assert main(["upgrade-export", str(old), "--config", str(TINY[0]), "--data", str(root)]) == 0
    assert "a Hugging Face model folder now" in capsys.readouterr().out
    _, attrs = _raw_items(root)
    torch.testing.assert_close(AutoModel.from_pretrained(old).encode_items(attrs[:5]),
                               AutoModel.from_pretrained(folder).encode_items(attrs[:5]))


def test_a_tokenizer_that_does_not_fit_the_weights_is_refused(tmp_path, export):
    from jepa4rec_dist.data.tokenization import TokenizerInfo, load_tokenizer
    from jepa4rec_dist.model import build_encoder

    minilm = TokenizerInfo.from_tokenizer("minilm", load_tokenizer("minilm"))
    # RoBERTa-sized weights (no tokenizer files in the folder) for data prepared with MiniLM's WordPiece
    ckpt = tmp_path / "roberta-like"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "roberta", "vocab_size": 50265, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "pad_token_id": 1, "hidden_act": "gelu"}))
    cfg = load_config(TINY, [f"--model.init_from={ckpt}"])
    with pytest.raises(ValueError, match=r"does not fit the data's tokenizer 'minilm' \(vocab_size 50265 vs 30522; pad_id 1 vs 0\)"):
        build_encoder(cfg.model, minilm)
    # the same folder with a tokenizer of its own (RoBERTa layout) that is not the data's
    load_tokenizer("roberta").save_pretrained(str(ckpt))
    with pytest.raises(ValueError, match=r"checkpoint's tokenizer .*does not fit the data's tokenizer 'minilm'"):
        build_encoder(cfg.model, minilm)
    # an export trained with MiniLM's tokenizer read against RoBERTa-layout data
    folder, _ = export
    roberta = TokenizerInfo.from_tokenizer("roberta", load_tokenizer("roberta"))
    with pytest.raises(ValueError, match=r"trained with tokenizer 'minilm', the data was prepared with 'roberta'"):
        build_encoder(load_config(TINY, [f"--model.init_from={folder}"]).model, roberta)


def test_tokenizer_auto_takes_the_checkpoint_folders_own_tokenizer(tmp_path, export):
    """tokenizer.name=auto (the default): data prepared for a Hugging Face folder with tokenizer files uses those
    files; for an export, the tokenizer it records; for minilm or no checkpoint, MiniLM's WordPiece."""
    from jepa4rec_dist.data.tokenization import load_tokenizer, resolve_tokenizer_name

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "roberta", "vocab_size": 50262}))
    assert resolve_tokenizer_name("auto", str(ckpt)) == "minilm"  # no tokenizer files: the pretrain check decides
    load_tokenizer("roberta").save_pretrained(str(ckpt))
    assert resolve_tokenizer_name("auto", str(ckpt)) == str(ckpt)
    assert resolve_tokenizer_name("auto", str(export[0])) == "minilm"  # what the export records
    assert resolve_tokenizer_name("auto", None) == resolve_tokenizer_name("auto", "minilm") == "minilm"
    assert resolve_tokenizer_name("roberta", str(ckpt)) == "roberta"  # an explicit name wins
    from jepa4rec_dist.data.prepare import prepare
    from tests.conftest import write_generic

    items, inter = write_generic(tmp_path / "raw", n_users=12)
    cfg = load_config(overrides=["--data.dataset=generic", f"--data.out_dir={tmp_path / 'p'}",
                                 f"--data.generic.items={items}", f"--data.generic.interactions={inter}",
                                 "--data.item_text.attributes=[title, brand]", f"--model.init_from={ckpt}"])
    manifest = prepare(cfg, progress=False)
    assert manifest["tokenizer"]["name"] == str(ckpt) and manifest["tokenizer"]["vocab_size"] == 50262
