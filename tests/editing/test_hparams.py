"""The published hyper-parameters are data (``keyscope/editing/hparams/*.json``, ``keyscope/model/edit_layers.json``):
every entry cites its source, every value feeds a field of the config class that reads it, the values are the
published ones (checked against the cited files), the loader rejects a file off its schema, and the files ship in
the wheel."""

from __future__ import annotations

import configparser
import fnmatch
import json
from dataclasses import fields
from pathlib import Path

import pytest

from keyscope._infra import published
from keyscope._infra.errors import KeyscopeError
from keyscope.editing import memit, rep, rome
from keyscope.model import models
from keyscope.studies import factworld

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "keyscope"

#: Every table keyscope ships and the config class whose fields its values set (``None``: not a config class).
TABLES = [
    (rome.PUBLISHED_TABLE, rome.ROMEConfig),
    (rome.PUBLISHED_BY_NAME_TABLE, rome.ROMEConfig),
    (memit.PUBLISHED_TABLE, memit.MEMITConfig),
    (rep.SETTINGS_TABLE, rep.REPConfig),
    (factworld.RECIPES, rome.ROMEConfig),
    (models.PUBLISHED_EDIT_LAYERS_TABLE, None),
]


def names(config_class) -> set[str]:
    return {f.name for f in fields(config_class)}


@pytest.mark.parametrize("table, config_class", TABLES, ids=lambda t: getattr(t, "path", None) and
                         f"{t.path}[{t.table}]")
def test_every_entry_cites_a_source_and_sets_fields_of_its_config(table, config_class):
    assert table.values, f"{table.path} [{table.table}] is empty"
    for name, values in table.values.items():
        assert table.citation(name).strip(), f"{table.path} {name} has no source"
        for field in values:
            assert table.citation(name, field).strip()
        if config_class is not None:
            assert set(values) <= names(config_class), (name, set(values) - names(config_class))
            config_class(**values)  # the values are valid settings (a MEMIT entry's layers included)
        else:
            assert set(values) == {"layer"} and isinstance(values["layer"], int)


def test_every_data_file_is_read_and_cited():
    """No data file lies unused beside the code, and every entry of every file has a non-empty source."""
    files = sorted(PACKAGE.joinpath("editing", "hparams").glob("*.json")) + [PACKAGE / "model" / "edit_layers.json"]
    read = {table.path for table, _ in TABLES}
    assert {str(path.relative_to(ROOT)) for path in files} == read
    for path in files:
        data = json.loads(path.read_text())
        assert data["description"].strip()
        for entries in data["tables"].values():
            assert all(entry["source"].strip() for entry in entries.values())


def test_rome_values_are_the_published_ones():
    # kmeng01/rome hparams/ROME/gpt2-xl.json: "layers": [17], "v_num_grad_steps": 20, "v_lr": 5e-1,
    # "v_weight_decay": 0.5, "clamp_norm_factor": 4, "kl_factor": 0.0625
    gpt2 = rome.PUBLISHED["gpt2"]
    assert gpt2 == {"v_num_grad_steps": 20, "v_lr": 5e-1, "v_weight_decay": 0.5, "clamp_norm_factor": 4,
                    "kl_factor": 0.0625}
    assert "kmeng01/rome hparams/ROME/gpt2-xl.json" in rome.PUBLISHED_TABLE.citation("gpt2")
    assert rome.ROMEConfig() == rome.ROMEConfig(**gpt2)  # the dataclass defaults are ROME's GPT-2 XL file
    assert models.PUBLISHED_EDIT_LAYERS["gpt2-xl"] == 17
    # zjunlp/EasyEdit hparams/ROME/llama-7b.yaml: layers [5], v_num_grad_steps 25, v_weight_decay 1e-3
    llama = rome.PUBLISHED["llama"]
    assert (llama["v_num_grad_steps"], llama["v_weight_decay"], llama["clamp_norm_factor"]) == (25, 1e-3, 4)
    assert llama["prefix_seeds"] == rome.EASYEDIT_PREFIX_SEEDS
    assert models.PUBLISHED_EDIT_LAYERS["meta-llama/Llama-2-7b-hf"] == 5
    # zjunlp/EasyEdit hparams/ROME/gpt2-medium.json: layers [8], clamp_norm_factor 3
    assert rome.PUBLISHED_BY_NAME["gpt2-medium"] == {**gpt2, "clamp_norm_factor": 3}
    assert models.PUBLISHED_EDIT_LAYERS["gpt2-medium"] == 8
    # kmeng01/memit hparams/ROME/EleutherAI_gpt-neox-20b.json: layers [15]
    assert models.PUBLISHED_EDIT_LAYERS["EleutherAI/gpt-neox-20b"] == 15


def test_memit_values_are_the_published_ones():
    # kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json: layers 3-8, clamp 0.75, 25 steps, λ = 15000
    gptj = memit.PUBLISHED["gptj"]
    assert gptj["layers"] == (3, 4, 5, 6, 7, 8) and gptj["mom2_update_weight"] == 15000
    assert (gptj["clamp_norm_factor"], gptj["v_num_grad_steps"], gptj["v_lr"]) == (0.75, 25, 5e-1)
    # zjunlp/EasyEdit hparams/MEMIT/llama-7b.yaml: layers [4, 5, 6, 7, 8], clamp 4, λ = 15000, decay 1e-3
    llama = memit.PUBLISHED["llama"]
    assert llama["layers"] == (4, 5, 6, 7, 8) and llama["mom2_update_weight"] == 15000
    assert (llama["clamp_norm_factor"], llama["v_weight_decay"]) == (4, 1e-3)
    assert memit.MEMITConfig() == memit.MEMITConfig(**memit.PUBLISHED["gpt2"])
    assert memit.PUBLISHED["gpt2"]["mom2_update_weight"] == 20000


def test_rep_settings_are_the_released_ones():
    released = rep.REPConfig.released()
    assert (released.rank, released.tau, released.lr, released.steps, released.batch_size) == (32, 0.9, 5e-4, 10, 15)
    assert released.anchor_weight == 50000 and released.positive_kinds == ("rephrase", "shuffle")
    assert "edit_llama.sh L31" in rep.SETTINGS_TABLE.citation("released", "tau")
    assert rep.REPConfig.paper() == rep.REPConfig(lr=5e-4, steps=10, objective="paper", gate_negatives=False,
                                                  train_long_context=False, dropout_at_inference=True)


def test_factworld_recipe():
    assert factworld.ROME_CONFIG == {"v_num_grad_steps": 60, "prefix_seeds": []}  # the card's JSON form
    assert factworld.RECIPES.entries()["rome"] == {"v_num_grad_steps": 60, "prefix_seeds": ()}
    assert "docs/history.md" in factworld.RECIPES.citation("rome", "v_num_grad_steps")


def test_the_tables_are_read_only_and_entries_are_fresh():
    with pytest.raises(TypeError):
        rome.PUBLISHED_TABLE.values["gpt2"]["v_lr"] = 1.0
    first = rome.PUBLISHED_TABLE.entries()
    first["gpt2"]["v_lr"] = 1.0
    assert rome.PUBLISHED_TABLE.entries()["gpt2"]["v_lr"] == 0.5
    with pytest.raises(KeyError):
        rome.PUBLISHED_TABLE.citation("no-such-family")


def write_package(tmp_path, monkeypatch, name: str, content) -> str:
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "t.json").write_text(content if isinstance(content, str) else json.dumps(content))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


GOOD_ENTRY = {"source": "kmeng01/rome hparams/ROME/gpt2-xl.json", "values": {"v_lr": 0.5, "layers": [1, 2]}}


@pytest.mark.parametrize("content, message", [
    ({"description": "x", "tables": {"t": {"a": GOOD_ENTRY}}, "extra": 1}, "unknown keys ['extra']"),
    ({"tables": {"t": {"a": {**GOOD_ENTRY, "sorce": "typo"}}}}, "unknown keys ['sorce']"),
    ({"tables": {"t": {"a": {**GOOD_ENTRY, "source": " "}}}}, "has no source"),
    ({"tables": {"t": {"a": {"values": {}}}}}, "has no source"),
    ({"tables": {"t": {"a": {**GOOD_ENTRY, "field_sources": {"v_num_grad_steps": "x"}}}}}, "cites fields"),
    ({"tables": {"t": {"a": {**GOOD_ENTRY, "values": {"v_lrr": 0.5}}}}}, "unknown fields ['v_lrr']"),
    ({"tables": {"u": {}}}, "no table 't'"),
    ("{not json", "not valid JSON"),
])
def test_a_file_off_the_schema_is_an_error_naming_it(tmp_path, monkeypatch, content, message):
    package = write_package(tmp_path, monkeypatch, f"fake_hparams_{abs(hash(message)) % 10**8}", content)
    with pytest.raises(KeyscopeError, match="t.json") as error:
        published.load(package, "t.json", "t", ["v_lr", "layers"])
    assert message in str(error.value)


def test_a_good_file_loads_with_tuples_and_citations(tmp_path, monkeypatch):
    package = write_package(tmp_path, monkeypatch, "fake_hparams_good", {
        "description": "x", "tables": {"t": {"a": {**GOOD_ENTRY, "field_sources": {"layers": "L3"}, "note": "n"}}}})
    table = published.load(package, "t.json", "t", ["v_lr", "layers"])
    assert table.entries() == {"a": {"v_lr": 0.5, "layers": (1, 2)}}
    assert table.citation("a") == GOOD_ENTRY["source"] and table.citation("a", "layers") == "L3"
    assert table.citation("a", "v_lr") == GOOD_ENTRY["source"]
    assert published.load(package, "t.json", "t", ["v_lr", "layers"]) is table  # read once


def test_the_data_files_are_package_data():
    """setup.cfg's ``[options.package_data]`` puts every JSON file of keyscope's code packages in the wheel."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    globs = {package: [g.strip() for g in value.split() if g.strip()]
             for package, value in config["options.package_data"].items()}
    for path in PACKAGE.rglob("*.json"):
        if "factworld/model" in path.as_posix():
            continue  # the shipped checkpoint: keyscope.factworld = model/*
        parts = path.relative_to(ROOT).parts
        shipped = any(
            ".".join(parts[:i]) in globs
            and any(fnmatch.fnmatch("/".join(parts[i:]), g) for g in globs[".".join(parts[:i])])
            for i in range(1, len(parts)))
        assert shipped, f"{path.relative_to(ROOT)} is not in setup.cfg's [options.package_data]"
