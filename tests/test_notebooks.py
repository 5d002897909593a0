"""The notebooks are the integration tests: each runs under papermill at its CI parameters
(notebooks/ci_params/NN_slug.json) in one shared run folder, in order, and the metrics it
records are asserted here. A guard checks every injected parameter is declared."""
import json

import pytest

from minigpt4_min import series, stage2

NOTEBOOKS = series.notebooks()


def test_there_are_notebooks():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_ci_parameters_are_declared(nb):
    declared = series.declared_parameters(nb)
    assert "run_dir" in declared
    injected = {"run_dir": "x", **series.ci_parameters(nb)}
    assert set(injected) <= set(declared), f"{nb.name}: undeclared {set(injected) - set(declared)}"
    for k, v in series.ci_parameters(nb).items():
        assert isinstance(v, type(declared[k])) or declared[k] is None, f"{k}: {v!r} vs {declared[k]!r}"


def test_02_defaults_are_the_tiny_preset():
    """Notebook 02's parameter cell repeats config.STAGE1["tiny"] as literals (papermill needs
    literals); the two must not drift apart, or the README's numbers describe neither."""
    from minigpt4_min.config import STAGE1
    p = series.declared_parameters(next(n for n in NOTEBOOKS if n.stem.startswith("02")))
    tiny = STAGE1["tiny"]
    assert (p["steps"], p["batch_size"], p["lr"]) == (tiny.max_steps, tiny.batch_size, tiny.lr)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(nb):
    cells = json.loads(nb.read_text())["cells"]
    assert not [c for c in cells if c.get("outputs") or c.get("execution_count")]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "class " not in code and "\ndef " not in "\n" + code, "notebooks import the library, never re-define it"
    assert "save_metrics(" in "".join(cells[-1]["source"])


def test_undeclared_parameter_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not declared"):
        series.check_parameters(NOTEBOOKS[0], {"run_dir": "x", "no_such_param": 1})


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    """Execute the whole series once at CI parameters; yields (run_dir, metrics)."""
    out = tmp_path_factory.mktemp("series")
    table = series.run_series(out, ci=True)
    return out, table


@pytest.mark.notebook
def test_series_runs_and_records_metrics(ci_run):
    out, table = ci_run
    assert set(table) == {p.stem for p in NOTEBOOKS}
    assert (out / "metrics.md").read_text().count("|") > 10
    for p in NOTEBOOKS:
        assert (out / "notebooks" / p.name).exists()


# The figures each notebook's text talks about, all of which the executed notebook must
# show (as image/png outputs). A figure is hidden when its call is not the last value of
# its cell, or ends in ";" (`plots.new_figure` closes every figure): write `display(fig)`.
FIGURES = {
    "00_overview": 5,           # pipeline (vicuna13b), pipeline (llama2-7b), parameter bars, scenes, tiny pipeline
    "01_frozen_encoder": 3,     # patch grid, query attention, LLM accuracy bars   # 01/05: checked by the issue-12 engineer
    "02_stage1_pretraining": 2,  # loss curve, captions before / after
    "03_stage2_data": 2,        # data funnel, raw / kept descriptions
    "04_stage2_finetuning": 2,  # loss curve, stage 1 / stage 2 bars
    "05_chat": 4,               # chat image, wording accuracy bars, POPE bars, emergent skills   # 01/05: checked by the issue-12 engineer
    "06_ablations": 3,          # architecture bars, data-fraction curves, caption-content bars
}


def test_every_notebook_has_a_figure_count():
    assert set(FIGURES) == {p.stem for p in NOTEBOOKS}


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_is_shown(ci_run, nb):
    cells = json.loads((ci_run[0] / "notebooks" / nb.name).read_text())["cells"]
    shown = [i for i, c in enumerate(cells) for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) == FIGURES[nb.stem], f"{nb.name}: figures in cells {shown}, expected {FIGURES[nb.stem]}"


@pytest.mark.notebook
def test_00_overview_metrics(ci_run):
    m = ci_run[1]["00_overview"]
    assert m["vicuna7b_llama_proj"] == 768 * 4096 + 4096
    assert m["vicuna13b_llama_proj"] == 768 * 5120 + 5120


@pytest.mark.notebook
def test_01_frozen_parts_metrics(ci_run):
    m = ci_run[1]["01_frozen_encoder"]
    # the shipped parts are what their manifest says (re-measured on other held-out scenes)
    assert m["shipped_parts"] is True
    assert abs(m["encoder_attribute_accuracy"] - m["manifest_encoder_attribute_accuracy"]) < 0.04
    assert abs(m["llm_redescribe_exact"] - m["manifest_llm_redescribe_exact"]) < 0.05
    assert m["llm_redescribe_exact"] >= 0.90            # target met by the shipped LLM
    assert m["llm_redescribe_exact_target_met"] is True
    # it answers questions about a scene in words well above chance (about 0.22 for this mix)
    assert m["llm_answers"] > 0.35 and m["llm_answers_words"] > 0.35
    # the quality target the shipped encoder misses is recorded, not hidden
    assert m["encoder_attribute_accuracy_target_met"] == (m["encoder_attribute_accuracy"] >= 0.97)
    # the LLM cannot see: asked about an image it is not shown, it guesses
    assert m["blind_guess_exact"] <= 0.05
    # questions of every kind, corpus and held-out wordings, in words and in <Img> tags
    from minigpt4_min.wordings import KINDS
    for split in ("corpus", "heldout"):
        for frame in ("words", "img"):
            assert {f"llm_ask/{split}_{frame}/{k}" for k in ("all",) + KINDS} <= set(m)
    # well above what a reader of the question alone gets (count: always the same kind of answer)
    assert m["llm_ask/corpus_words/all"] > 0.6 and m["llm_ask/heldout_img/all"] > 0.45
    worst = min(m[f"llm_ask/heldout_img/{k}"] for k in KINDS)
    assert m["llm_heldout_img_worst_kind_target_met"] == (worst >= 0.95)
    assert m["llm_heldout_img_worst_kind_target_measured"] == worst
    # notebook 05's POPE probe, scenes in words: "no" to an absent shape (the shipped LLM's
    # "yes" to a shape there in another colour is recorded: see curriculum.py)
    for frame in ("words", "img"):
        assert m[f"llm_pope_{frame}/random/accuracy"] > 0.9
        assert 0.0 <= m[f"llm_pope_{frame}/adversarial/yes_share"] <= 1.0
        # as many questions in each setting: "all" is their mean
        assert m[f"llm_pope_{frame}/all/accuracy"] == pytest.approx(
            (m[f"llm_pope_{frame}/random/accuracy"] + m[f"llm_pope_{frame}/adversarial/accuracy"]) / 2)


@pytest.mark.notebook
def test_02_stage1_metrics(ci_run):
    m = ci_run[1]["02_stage1_pretraining"]
    assert m["loss_last"] < m["loss_first"]
    assert m["caption_attribute_accuracy"] > m["caption_attribute_accuracy_before"] + 0.2
    assert m["frozen_unchanged"] is True
    assert m["trainable_params"] == m["proj_in"] * m["proj_out"] + m["proj_out"]


@pytest.mark.notebook
def test_03_stage2_data_metrics(ci_run):
    m = ci_run[1]["03_stage2_data"]
    assert m["n_generated"] >= m["n_refined"] >= m["n_kept"] > 0
    # by construction of refine + review: nothing false, cut off or repeated survives
    assert m["hallucinated_mentions_kept"] == 0 and m["kept_chair_i"] == 0.0
    assert m["kept_empty_or_cut_off"] == 0 and m["kept_repeated_sentence_rate"] == 0.0
    assert m["hallucinated_mentions_removed_by_review"] == m["hallucinated_mentions_refined"] > 0
    assert m["refined_repeated_sentence_rate"] <= m["raw_repeated_sentence_rate"]
    if m["raw_repeated_sentence_rate"] > 0:            # repeated sentences there were: the refiner cut them
        assert m["refined_repeated_sentence_rate"] < m["raw_repeated_sentence_rate"]
    out = ci_run[0] / "stage2_data" / "cc_sbu_align"
    ann = json.loads((out / "filter_cap.json").read_text())["annotations"]
    assert len(ann) == m["n_kept"] and all((out / "image" / f"{a['image_id']}.jpg").exists() for a in ann)


@pytest.mark.notebook
def test_04_stage2_metrics_and_same_seed_same_table(ci_run, tmp_path):
    out, table = ci_run
    m = table["04_stage2_finetuning"]
    assert m["loss_last"] < m["loss_first"]
    assert m["n_train_pairs"] == table["03_stage2_data"]["n_kept"]
    # the ceiling row: the frozen LLM answers the same questions from the notes in words
    assert 0.35 < m["vqa_ceiling_notes_in_words"] <= 1.0
    # steps 0: scaled to the curated set (1.4 passes, at least 100)
    assert m["steps"] == stage2.steps_for(m["n_train_pairs"], 16)
    # the yardstick: least squares onto the notes beats the projection trained from 400 steps of captions
    assert m["reference/detailed/attribute_accuracy"] > m["stage1/detailed/attribute_accuracy"]
    assert m["reference/vqa_position"] > m["stage1/vqa_position"]
    for k, v in m.items():
        if k.endswith(("failure_rate", "chair_i", "object_recall", "vqa_accuracy")):
            assert 0.0 <= v <= 1.0, k
    # same seed -> same table: run the notebook again on the same inputs
    nb = next(p for p in NOTEBOOKS if p.stem.startswith("04"))
    series.run_notebook(nb, tmp_path, {"run_dir": str(out), **series.ci_parameters(nb)})
    again = json.loads((out / "metrics" / "04_stage2_finetuning.json").read_text())
    table_keys = [k for k in m if k.startswith(("stage1/", "stage2/", "reference/"))
                  or k in ("loss_first", "loss_last", "vqa_ceiling_notes_in_words")]
    assert len(table_keys) > 40
    assert {k: again[k] for k in table_keys} == {k: m[k] for k in table_keys}


@pytest.mark.notebook
def test_05_chat_metrics(ci_run):
    m = ci_run[1]["05_chat"]
    for who in ("stage_2", "stage_1_only", "no_image", "chance"):
        for skill in ("poem", "story", "ad"):
            assert 0.0 <= m[f"{who}/{skill}"] <= 1.0
    # the image is what makes the skills name real objects: the image-less LLM does worse
    assert m["skills_stage2_mean"] > m["skills_no_image_mean"]
    # the fair 5-turn check, POPE, the sampled answers: measured and recorded
    assert m["turns/n"] == 6 and 0.0 <= m["turns/turn5"] <= 1.0 and 0.0 <= m["turns/turn5_other_image"] <= 1.0
    assert m["turns/cut_at_default"] == 0 and m["five_turns_never_cut_target_met"] is True   # 512 positions
    assert m["turns/longest_5turn_positions"] + 120 <= 512
    assert 0.0 <= m["pope/all/yes_share"] <= 1.0 and 0.0 <= m["pope/adversarial/accuracy"] <= 1.0
    assert m["sampled/n"] == 60 and m["sampled/clean_share"] >= 0.9
    assert m["pope_accuracy_ge_085_target_met"] == (m["pope/all/accuracy"] >= 0.85)
    # the yardstick (the best linear map in place of the trained layer) reads absent shapes
    # almost perfectly and the trained layer does not: the swap took place
    assert m["pope_best_linear_map/random/accuracy"] >= 0.9 > m["pope/random/accuracy"]
    for k in ("colour", "count", "yesno", "absent"):
        assert 0.0 <= m[f"ask/heldout/{k}"] <= 1.0 and 0.0 <= m[f"ask/corpus/{k}"] <= 1.0


@pytest.mark.notebook
def test_five_turn_chat_keeps_to_its_image(ci_run):
    """Ground-truth questions over 5 turns, on the stage-2 model the CI series trained: the
    answers match the uploaded image far more often than another image, in the first turns
    and still in the last two."""
    from minigpt4_min import shapesworld as sw
    from minigpt4_min.config import get_config
    from minigpt4_min.conversation import Chat
    from minigpt4_min.evaluate import vqa_correct, vqa_questions
    from minigpt4_min.model import GenerationSettings, MiniGPT4

    model = MiniGPT4.from_config(get_config("tiny"), projection=ci_run[0] / "stage2" / "last")
    right, other = [[0] * 5 for _ in range(2)]
    n = 20
    for i in range(n):
        scene, another = sw.scene_at("test", i), sw.scene_at("test", 100 + i)
        qs = vqa_questions(scene)
        chat = Chat(model, settings=GenerationSettings(max_new_tokens=24))
        chat.upload_img(sw.render(scene))
        for t in range(5):
            q = qs[t % len(qs)]
            chat.ask(q.text)
            a = chat.answer()
            right[t] += vqa_correct(a, q)
            q2 = next((o for o in vqa_questions(another) if o.kind == q.kind), None)
            other[t] += q2 is not None and vqa_correct(a, q2)
    assert len(chat.conv.messages) == 10                      # 5 questions, 5 answers, one image
    assert sum(right) >= 1.5 * sum(other), (right, other)   # an image-blind model scores the same on both
    assert right[3] + right[4] > other[3] + other[4], (right, other)


@pytest.mark.notebook
def test_06_ablations_metrics(ci_run):
    """The ablation notebook ran every cell for every seed, and each verdict follows its numbers."""
    from minigpt4_min import ablations, verdicts
    m = ci_run[1]["06_ablations"]
    assert m["n_cells"] == len(ablations.cells(seeds=range(m["seeds"]))) == 11 * m["seeds"]
    claims = sorted({k.split("/")[0] for k in m if k.startswith("claim")})
    assert len(claims) == len(verdicts.CLAIMS)
    for c in claims:
        v, d, s = m[f"{c}/verdict"], m[f"{c}/difference"], m[f"{c}/spread"]
        assert v in ("holds", "does not hold", "not resolved by the spread")
        assert (v == "holds") == (d > s) and (v == "does not hold") == (-d > s)
    for k, v in m.items():
        if k.endswith("/mean") and ("vqa" in k or "recall" in k):
            assert 0.0 <= v <= 1.0, k
    # the best linear map (the answer key) beats every trained projection on position VQA
    trained = [v for k, v in m.items() if k.endswith("stage2/vqa_position/mean")]
    assert len(trained) == 11 and m["best_linear_map/vqa_position"] > max(trained)
