"""The --bpw budget: reachable ranges, the knapsack, the sensitivity pass and the
per-tensor decision through quantize, resume, reuse and export."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from slim2gguf import budget
from slim2gguf.budget import BudgetError, ModelShapes, check_budget, model_shapes, parse_label, reachable, solve
from slim2gguf.checkpoint import Checkpoint
from slim2gguf.format import slim_type
from slim2gguf.methods import QuantSettings
from slim2gguf.pipeline import CalibSettings, load_allocation, quantize_model


def toy_shapes() -> ModelShapes:
    linears = {f"model.layers.{b}.mlp.down_proj": (64, 256) for b in range(4)}
    return ModelShapes(linears, embed=(100, 64), output=None, fixed_params=640, fixed_bits=640 * 32.0)


def toy_scores(shapes: ModelShapes) -> dict[str, dict[str, float]]:
    """Error falling by 4x per bit and by 1.3x per group halving; later blocks weigh more."""
    scores = {}
    for name, cands in shapes.candidates().items():
        weight = 1.0 + (int(name.split(".")[2]) if name.startswith("model.") else 2)
        scores[name] = {}
        for label, _ in cands:
            if name == budget.EMBED:
                bits = budget.STANDARD_BPW[label]
                scores[name][label] = weight * 4.0 ** -bits
            else:
                s = parse_label(label)
                scores[name][label] = weight * 4.0 ** -s.bits * 1.3 ** -(128 // s.group_size)
    return scores


def test_settings_and_bits():
    assert [budget.label(t) for t in budget.linear_settings(192)] == ["slim2-g64", "slim2-g32", "slim3-g64", "slim3-g32", "slim4-g64", "slim4-g32"]
    assert parse_label("slim3-g64") == slim_type(3, 64) and slim_type(3, 64).bits_per_weight == 3.5


def test_solve_finds_the_optimum():
    import itertools

    shapes = ModelShapes({f"model.layers.{b}.self_attn.k_proj": (32, 128) for b in range(3)}, (10, 64), None, 0, 0.0)
    scores = toy_scores(shapes)
    names = sorted(shapes.candidates())
    cands = [shapes.candidates()[n] for n in names]
    for target in (3.0, 3.6, 4.4):
        decision = solve(target, shapes, scores)
        limit = target * shapes.params
        feasible = [combo for combo in itertools.product(*cands) if sum(b for _, b in combo) <= limit]
        optimum = min(sum(scores[n][label] for n, (label, _) in zip(names, combo)) for combo in feasible)
        assert sum(scores[n][c] for n, c in decision.choices.items()) == pytest.approx(optimum)


def test_solve_lands_on_the_budget_and_spends_it_well():
    shapes = toy_shapes()
    scores = toy_scores(shapes)
    lo, hi = reachable(shapes)
    previous = float("inf")
    for target in (lo + 0.05, (lo + hi) / 2, hi - 0.3):
        decision = solve(target, shapes, scores)
        assert abs(decision.bpw - target) <= budget.TOLERANCE and decision.bpw <= target + 1e-9
        total = sum(scores[n][c] for n, c in decision.choices.items())
        assert total < previous  # more bits, less estimated error
        previous = total
    mid = solve((lo + hi) / 2, shapes, scores).choices
    bits = [parse_label(mid[f"model.layers.{b}.mlp.down_proj"]).bits_per_weight for b in range(4)]
    assert bits == sorted(bits) and bits[0] < bits[-1]  # the more sensitive blocks get more


@pytest.mark.parametrize("target", [1.0, 30.0])
def test_out_of_reach_names_the_range(target):
    shapes = toy_shapes()
    lo, hi = reachable(shapes)
    with pytest.raises(BudgetError, match=rf"from {lo:.2f} .* to {hi:.2f}"):
        check_budget(target, shapes)


def test_coarse_steps_name_the_nearest_budgets():
    shapes = toy_shapes()
    _, hi = reachable(shapes)  # one step down from the top: a whole down_proj from g32 to g64 (8192 bits)
    step = 64 * 256 * 0.5 / shapes.params
    with pytest.raises(BudgetError, match="nearest budgets are") as err:
        check_budget(hi - step / 2, shapes)
    below, above = (float(x) for x in str(err.value).removesuffix(".").split("are ")[1].split(" and "))
    assert below == pytest.approx(hi - step, abs=2e-3) and above == pytest.approx(hi, abs=2e-3)


def test_model_shapes_count_every_parameter(tiny_model):
    from slim2gguf.models import load_model

    model = load_model(tiny_model)
    shapes = model_shapes(tiny_model, None)
    assert shapes.params == sum(p.numel() for p in model.parameters())
    assert shapes.output == tuple(model.lm_head.weight.shape) and len(shapes.linears) == 14
    down = model_shapes(tiny_model, ("ffn_down",))
    assert len(down.linears) == 2 and down.params == shapes.params
    assert down.fixed_bits == shapes.fixed_bits + 16 * sum(r * c for n, (r, c) in shapes.linears.items() if "down" not in n)


def calib(text) -> CalibSettings:
    return CalibSettings(str(text), nsamples=8, seqlen=64, seed=3)


@pytest.mark.parametrize("sensitivity", ["fisher", "hessian"])
def test_sensitivity_scores_fall_with_bits(tiny_model, tiny_text, sensitivity):
    from rich.console import Console

    from slim2gguf.calib import calibration_windows
    from slim2gguf.models import load_model, load_tokenizer
    from slim2gguf.sensitivity import measure

    model = load_model(tiny_model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    windows = calibration_windows(str(tiny_text), model, load_tokenizer(tiny_model), 4, 64, 0)
    shapes = model_shapes(tiny_model, None)
    scores = measure(model, windows, shapes, sensitivity, torch.device("cpu"), Console(quiet=True))
    assert set(scores) == set(shapes.candidates())
    for name, by_choice in scores.items():
        if name.startswith("model."):
            assert by_choice["slim2-g32"] > by_choice["slim3-g32"] > by_choice["slim4-g32"] > 0
        else:
            assert by_choice["q4_0"] > by_choice["q5_0"] > by_choice["q8_0"] > 0
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def bpw_ckpt(tiny_model, tiny_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpw") / "ck"
    report = quantize_model(str(tiny_model), out, QuantSettings("slim", sba_tokens=256, bpw=4.0), calib(tiny_text))
    return out, report


def test_bpw_checkpoint_follows_the_decision(bpw_ckpt):
    out, report = bpw_ckpt
    ck = Checkpoint(out)
    decision = ck.budget
    assert decision["target_bpw"] == 4.0 and abs(decision["bpw"] - 4.0) <= budget.TOLERANCE
    assert decision["sensitivity"] == "fisher" and set(decision["scores"]) == set(decision["choices"])
    tensors = dict(ck.tensors())
    assert len({(qt.bits, qt.group_size) for qt in tensors.values()}) > 1  # really mixed
    for name, qt in tensors.items():
        assert budget.label(qt.stype) == decision["choices"][name]
        assert ck.manifest["tensors"][name]["group_size"] == qt.group_size
    assert decision["choices"]["token_embd"] in budget.EMBED_CANDIDATES
    assert report.decision.choices == decision["choices"]


def test_bpw_is_deterministic_and_resumes(bpw_ckpt, tiny_model, tiny_text, tmp_path, monkeypatch):
    from test_pipeline import files_of

    from slim2gguf import checkpoint as ckpt_mod
    from slim2gguf import score_cache, sensitivity

    monkeypatch.setattr(score_cache, "root", lambda: tmp_path / "scores")  # measured again, not read back
    out = tmp_path / "again"
    original = ckpt_mod.CheckpointWriter.write_block

    def write_then_stop(self, index, tensors, info):
        original(self, index, tensors, info)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.CheckpointWriter, "write_block", write_then_stop)
    quant = QuantSettings("slim", sba_tokens=256, bpw=4.0)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(str(tiny_model), out, quant, calib(tiny_text))
    monkeypatch.setattr(ckpt_mod.CheckpointWriter, "write_block", original)
    monkeypatch.setattr(sensitivity, "measure", lambda *a, **k: pytest.fail("a resumed run measures again"))
    report = quantize_model(str(tiny_model), out, quant, calib(tiny_text))
    assert report.resumed_from == 1
    assert files_of(out) == files_of(bpw_ckpt[0])


def test_allocation_reuse_covers_per_tensor_settings(bpw_ckpt, tiny_model, tiny_text, tmp_path):
    alloc = load_allocation(bpw_ckpt[0] / "manifest.json")
    out = tmp_path / "reused"
    quantize_model(str(tiny_model), out, QuantSettings("slim", 2, 128), CalibSettings(str(tiny_text), 8, 64, seed=9), allocation=alloc)
    reused, source = Checkpoint(out), Checkpoint(bpw_ckpt[0])
    assert reused.allocation() == source.allocation() and reused.budget == source.budget
    assert {n: q.group_size for n, q in reused.tensors()} == {n: q.group_size for n, q in source.tensors()}
    with pytest.raises(ValueError, match="drop --bpw"):
        quantize_model(str(tiny_model), tmp_path / "x", QuantSettings("slim", bpw=3.0), calib(tiny_text), allocation=alloc)


def test_cli_refuses_bad_budgets_and_counts_before_loading_weights(tiny_model, tiny_text, tmp_path, monkeypatch):
    from slim2gguf import pipeline
    from slim2gguf.cli import app

    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("weights loaded"))
    runner = CliRunner()
    base = ["quantize", str(tiny_model), "-o", str(tmp_path / "o"), "--calib", str(tiny_text)]
    for extra, message in (
        (["--bpw", "1.5"], "out of reach for this model: from"),
        (["--bpw", "3", "--bits", "3"], "not both"),
        (["--bpw", "3", "--method", "rtn"], "use --method slim or gptq"),
        (["--bpw", "3", "--sensitivity", "guess"], "--sensitivity must be one of fisher, hessian"),
        (["--nsamples", "0"], "--nsamples must be ≥ 1 and --seqlen ≥ 2, got 0 and 512"),
        (["--seqlen", "1"], "--nsamples must be ≥ 1 and --seqlen ≥ 2, got 128 and 1"),
        (["--nsamples", str(10**20)], "--nsamples × --seqlen is 51,200,000,000,000,000,000,000 tokens; calibration holds at most 2,147,483,647"),
        (["--sqc-lambda", "-1"], "--sqc-lambda weighs the salient elements' error: it must be ≥ 0, got -1"),
        (["--sba-tokens", "0"], "--sba-tokens must be ≥ 1, got 0"),
        (["--damp", "nan"], "--damp must be positive, at most 1e+06, got nan"),
        (["--damp", "1e39"], "--damp must be positive, at most 1e+06, got 1e+39"),  # said to raise --damp, which overflowed
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
        (["--sqc-lambda", "nan"], "--sqc-lambda weighs the salient elements' error: it must be ≥ 0, got nan"),
    ):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["convert", str(tiny_model), "-o", str(tmp_path / "o.gguf"), "--bpw", "4", "--embed-type", "q8_0"])
    assert result.exit_code == 2 and "drop --embed-type" in result.output
    result = runner.invoke(app, ["convert", str(tiny_model), "-o", str(tmp_path / "o.gguf"), "--bits", "2", "--output-type", "q9_k"])
    assert result.exit_code == 2 and "output type must be one of f32, f16, bf16, q8_0" in result.output
    taken = tmp_path / "taken"
    taken.write_text("")
    for args in (["quantize", str(tiny_model), "-o", str(taken)], ["convert", str(tiny_model), "-o", str(tmp_path / "o.gguf"), "--checkpoint", str(taken)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and f"{taken} is a file, not a checkpoint folder" in result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_bpw_file_lands_on_the_budget(tiny_text, tmp_path):
    """Through the real exporter: the file's bits per weight (every tensor) is what the
    decision computed from shapes, within the tolerance of --bpw, and inspect shows the mix."""
    from export_helpers import tiny_model_dir
    from rich.console import Console

    from slim2gguf.export import export_gguf
    from slim2gguf.inspect_gguf import print_inspect
    from slim2gguf.named_models import demo_model_dir

    model = tiny_model_dir(tmp_path / "llama", "LlamaForCausalLM", demo_model_dir(), tie_word_embeddings=False)
    sizes = budget._file_sizes(model_shapes(model, None))  # its vocabulary is most of it: budgets come in clusters
    target = float(sizes[len(sizes) // 2])
    quantize_model(str(model), tmp_path / "ck", QuantSettings("slim", sba_tokens=256, bpw=target), calib(tiny_text))
    decision = Checkpoint(tmp_path / "ck").budget
    report = export_gguf(tmp_path / "ck", tmp_path / "out.gguf", progress=False)
    assert report.file_bpw == pytest.approx(decision["bpw"], abs=1e-9)
    assert abs(report.file_bpw - target) <= budget.TOLERANCE
    console = Console(record=True, width=200)
    print_inspect(tmp_path / "out.gguf", console)
    text = console.export_text()
    assert "bits per weight by block and tensor class" in text
    for stock in ("token_embd", "output"):
        assert f"{decision['choices'][stock].upper()}" in text


def test_scores_are_saved_whole_and_read_back_only_on_their_key(tiny_model, tmp_path, monkeypatch):
    from slim2gguf import score_cache

    monkeypatch.setattr(score_cache, "root", lambda: tmp_path)
    shapes = model_shapes(tiny_model, ("ffn_down",))
    windows = torch.arange(64).view(2, 32)
    key = score_cache.score_key(tiny_model, windows, "fisher", shapes, torch.device("cpu"))
    twin = tmp_path / "twin"
    shutil.copytree(tiny_model, twin)  # copy2: each file keeps its size and modification time
    scores = {name: {label: float(i) for i, (label, _) in enumerate(choices)} for name, choices in shapes.candidates().items()}
    assert score_cache.load_scores(key) is None
    score_cache.save_scores(key, scores)
    assert score_cache.load_scores(key) == scores
    for other in (
        score_cache.score_key(tiny_model, windows, "hessian", shapes, torch.device("cpu")),
        score_cache.score_key(tiny_model, windows.flip(0), "fisher", shapes, torch.device("cpu")),
        score_cache.score_key(tiny_model, windows, "fisher", model_shapes(tiny_model, None), torch.device("cpu")),
        score_cache.score_key(twin, windows, "fisher", shapes, torch.device("cpu")),  # another folder, its files alike in name, size and time: its weights may differ
    ):
        assert score_cache.load_scores(other) is None
    (saved,) = tmp_path.glob("*.json")
    name = next(iter(scores))
    score_cache.save_scores(key, {**scores, name: dict(list(scores[name].items())[1:])})
    assert score_cache.load_scores(key) is None  # a candidate without a score
    saved.write_text(saved.read_text()[:-20])
    assert score_cache.load_scores(key) is None  # cut short
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_a_second_budget_reuses_the_scores_and_reads_one_block_at_a_time(bpw_ckpt, tiny_model, tiny_text, tmp_path, monkeypatch):
    from conftest import imported_script
    from rich.console import Console

    from slim2gguf import pipeline, sensitivity

    monkeypatch.setattr(sensitivity, "measure", lambda *a, **k: pytest.fail("measured again"))
    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("the whole model loaded"))
    console = Console(record=True, width=300)
    quantize_model(str(tiny_model), tmp_path / "ck", QuantSettings("slim", sba_tokens=256, bpw=4.5), calib(tiny_text), console=console)
    with imported_script("bench_frontier") as bench:
        assert bench.REUSED_SCORES in console.export_text()  # what the frontier harness records as "scores_reused"
    first, second = Checkpoint(bpw_ckpt[0]).budget, Checkpoint(tmp_path / "ck").budget
    assert second["scores"] == first["scores"] and second["target_bpw"] == 4.5
    assert second["choices"] != first["choices"]


def test_native_scores_read_the_rows_most_at_stake_and_an_even_sample_of_the_rest(tiny_model, tiny_text, monkeypatch):
    from rich.console import Console

    from slim2gguf import sensitivity
    from slim2gguf.calib import calibration_windows
    from slim2gguf.models import load_model, load_tokenizer

    assert sensitivity.sampled_rows(torch.ones(sensitivity.SAMPLE_ROWS)) is None
    monkeypatch.setattr(sensitivity, "SAMPLE_ROWS", 64)
    at_stake = torch.ones(256)
    at_stake[[7, 100, 101]] = 50.0
    rows, counts = sensitivity.sampled_rows(at_stake)
    assert rows[:3].tolist() == [7, 100, 101] and len(set(rows.tolist())) == 64  # the outliers first, for themselves
    spread = rows[sensitivity.KEEP_ROWS :].tolist()
    assert spread == sorted(spread) and spread[-1] == 255 and max(b - a for a, b in zip(spread, spread[1:])) <= 10
    assert counts[: sensitivity.KEEP_ROWS].eq(1).all() and float(counts.sum()) == pytest.approx(256)
    model = load_model(tiny_model)
    windows = calibration_windows(str(tiny_text), model, load_tokenizer(tiny_model), 4, 64, 0)
    shapes = model_shapes(tiny_model, None, native=True)
    sampled = sensitivity.measure(model, windows, shapes, "fisher", torch.device("cpu"), Console(quiet=True))
    monkeypatch.setattr(sensitivity, "SAMPLE_ROWS", 1 << 30)
    full = sensitivity.measure(model, windows, shapes, "fisher", torch.device("cpu"), Console(quiet=True))
    ratios = [sampled[n][c] / full[n][c] for n in full if n in shapes.linears for c in full[n]]
    assert len(ratios) > 20 and all(0.8 < r < 1.25 for r in ratios), sorted(ratios)  # scaled: unscaled would be 1/4 or 1/2
    assert any(abs(r - 1) > 1e-6 for r in ratios)  # really a sample
    assert all(sampled[n] == full[n] for n in full if n not in shapes.linears)  # embedding and output: every row


@pytest.mark.parametrize("native", [True, False])
def test_budgets_may_give_the_embedding_and_output_k_quants(native):
    """Budgets of either format add the K-quants where their 256-wide blocks divide the rows."""
    shapes = ModelShapes({"model.layers.0.mlp.down_proj": (256, 512)}, embed=(1000, 512), output=(1000, 512),
                         fixed_params=0, fixed_bits=0.0, native=native)  # fmt: skip
    for name in (budget.EMBED, budget.OUTPUT):
        assert [c for c, _ in shapes.candidates()[name]] == list(budget.LEGACY_EMBED_TYPES + budget.STORAGE_EMBED_TYPES)
    narrow = replace(shapes, embed=(1000, 576), output=None)
    assert [c for c, _ in narrow.candidates()[budget.EMBED]] == list(budget.LEGACY_EMBED_TYPES)
    with pytest.raises(budget.BudgetError, match="token embedding and output Q2_K"):
        budget.check_budget(2.0, shapes)


def test_embedding_k_quant_scores_are_the_storage_rounding_over_every_row(tiny_text, tmp_path):
    """The Fisher score of a K-quant embedding is ½ΣF·ΔW² of the exporter's rounding;
    rows the windows never touch are skipped, which changes nothing."""
    from export_helpers import tiny_model_dir
    from rich.console import Console

    from slim2gguf import sensitivity
    from slim2gguf.calib import calibration_windows
    from slim2gguf.models import load_model, load_tokenizer
    from slim2gguf.named_models import demo_model_dir
    from slim2gguf.progress import Progress

    path = tiny_model_dir(tmp_path / "wide", "LlamaForCausalLM", demo_model_dir(), hidden_size=256, head_dim=64,
                          tie_word_embeddings=False)  # fmt: skip
    model = load_model(path)
    windows = calibration_windows(str(tiny_text), model, load_tokenizer(path), 4, 64, 0)
    shapes = model_shapes(path, ("ffn_down",), native=True)
    scores = sensitivity.measure(model, windows, shapes, "fisher", torch.device("cpu"), Console(quiet=True))
    with Progress(disable=True) as progress:
        fisher = sensitivity.fisher_weights(model, sensitivity.estimator_windows(windows), shapes, torch.device("cpu"), progress)
    embedding = model.get_input_embeddings().weight.detach()
    assert not bool(fisher[budget.EMBED].ne(0).any(1).all())  # some rows really skipped
    for stock in budget.STORAGE_EMBED_TYPES:
        expected = 0.5 * float((fisher[budget.EMBED] * sensitivity.native_error(embedding, stock).pow(2)).sum())
        assert scores[budget.EMBED][stock] == pytest.approx(expected, rel=1e-5), stock
    assert scores[budget.OUTPUT]["q2_k"] > scores[budget.OUTPUT]["q4_k"] > scores[budget.OUTPUT]["q6_k"]


def test_a_tied_model_measures_beside_its_skeleton_and_still_quantizes(tiny_text, tmp_path, monkeypatch):
    """The measurement loads a whole copy and frees the skeleton's embedding (the head too,
    where tied to it) meanwhile; quantization then runs block by block on the reloaded,
    re-tied embedding, as a run whose scores were saved does."""
    from export_helpers import tiny_model_dir
    from test_pipeline import files_of

    from slim2gguf import pipeline, sensitivity
    from slim2gguf.named_models import demo_model_dir

    model = tiny_model_dir(tmp_path / "qwen", "Qwen2ForCausalLM", demo_model_dir(), tie_word_embeddings=True)
    seen = []
    measure = sensitivity.measure
    monkeypatch.setattr(sensitivity, "measure", lambda m, *a: seen.append(m) or measure(m, *a))
    target = float(budget._file_sizes(model_shapes(model, None))[-3])
    quantize_model(str(model), tmp_path / "a", QuantSettings("slim", sba_tokens=256, bpw=target), calib(tiny_text))
    (whole,) = seen
    assert not any(p.is_meta for p in whole.parameters())  # a whole model, not the skeleton
    monkeypatch.setattr(pipeline, "load_model", lambda *_: pytest.fail("the whole model loaded again"))
    quantize_model(str(model), tmp_path / "b", QuantSettings("slim", sba_tokens=256, bpw=target), calib(tiny_text))
    assert Checkpoint(tmp_path / "a").budget == Checkpoint(tmp_path / "b").budget
    assert files_of(tmp_path / "a" / "blocks") == files_of(tmp_path / "b" / "blocks")
