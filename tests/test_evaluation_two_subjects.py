"""The evaluation's two-subject mode (`python -m training.evaluate --two_subjects`) on the tiny test bed.

The leakage figures against images built by hand (each subject's own photo pasted on one side: its own
identity is exactly 1, the other subject's is the cosine of the two photos' embeddings), the face matching,
the prompts without their subject words, the models it samples (two subjects on one patch, the manual
regions as the Apply node's masks, auto regions as the Apply node's `region: auto`), and the command line
end to end: files, rows, a figure recomputed from an image on disk, the plot and the grids.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_runs import reset_after_run

from nested_attention_comfy.model import attn2_replacements
from training.evaluation import cli as evaluate_cli
from training.evaluation import config as evaluate_config
from training.evaluation import metrics, two_subjects
from training.evaluation.two_subjects import PairJob, PairMethod, PairPrompt, match_faces, score_pair_image
from training.tiny import scorers as tiny_scorers


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two tiny-domain subject photos (a coloured shape on white, 64 x 64), as the CLI generates them."""
    from nested_attention.images import from_pil
    from training.data.dataset import open_image
    from training.tiny.models import make_tiny_dataset

    folder = make_tiny_dataset(tmp_path_factory.mktemp("photos"), count=2, size=64, seed=1)
    return [from_pil(open_image(str(p))) for p in sorted(folder.glob("*.png"))]


def side_by_side(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Two (64, 64, 3) photos on one white (64, 160, 3) canvas, with a white gap between them."""
    canvas = torch.ones(64, 160, 3)
    canvas[:, :64], canvas[:, 96:] = left, right
    return canvas


def test_each_face_scores_one_against_its_own_photo_and_the_photos_cosine_against_the_other(photos):
    a, b = photos
    scorers = metrics.Scorers(identity=tiny_scorers.TinyIdentity())
    refs = [scorers.reference(p, f"photo {i}").identity for i, p in enumerate(photos)]
    across = float(metrics.cosine(refs[0], refs[1]))  # the two photos' own similarity
    assert across < 0.99
    own, other = "identity_own[tiny-face]", "identity_other[tiny-face]"
    for image in (side_by_side(a, b), side_by_side(b, a)):  # the matching does not depend on the side
        rows = score_pair_image(image, scorers, refs)
        assert [r["faces_detected"] for r in rows] == [2, 2] and all(r["face_found"] for r in rows)
        for row in rows:
            assert row[own] == pytest.approx(1.0, abs=1e-12)
            assert row[other] == pytest.approx(across, abs=1e-12)
    # Both faces are A: the image leaks A into B's place. B's face resembles A more than B.
    rows = score_pair_image(side_by_side(a, a), scorers, refs)
    assert rows[0][own] == pytest.approx(1.0) and rows[1][own] == pytest.approx(across)
    assert rows[1][other] == pytest.approx(1.0)
    # One face: it goes to the subject it resembles; the other subject is a failure, counted.
    canvas = torch.ones(64, 160, 3)
    canvas[:, 96:] = b
    rows = score_pair_image(canvas, scorers, refs)
    assert [r["face_found"] for r in rows] == [False, True] and rows[0][own] is None
    assert rows[1][own] == pytest.approx(1.0)
    rows = score_pair_image(torch.ones(64, 160, 3), scorers, refs)
    assert [r["faces_detected"] for r in rows] == [0, 0] and not any(r["face_found"] for r in rows)


def test_faces_are_matched_one_to_one_by_the_largest_summed_similarity():
    # Face 0 resembles both more than face 1 does; the sum picks face 0 for subject 1, face 1 for subject 0.
    assert match_faces(torch.tensor([[0.9, 0.95], [0.5, 0.1]])) == {0: 1, 1: 0}
    assert match_faces(torch.tensor([[0.9, 0.2], [0.3, 0.8]])) == {0: 0, 1: 1}
    assert match_faces(torch.tensor([[0.2, 0.7]])) == {1: 0}


def test_two_subject_prompts_lose_both_words_for_clip_t():
    assert PairPrompt("a photo of a {a} and a {b} laughing together").without_subjects() == (
        "a photo of laughing together"
    )
    assert PairPrompt("an oil painting of a {a} and a {b}").without_subjects() == "an oil painting of"
    assert (
        PairPrompt("a {a} and a {b} side by side").render(["man", "woman"])
        == "a man and a woman side by side"
    )
    for prompt in two_subjects.PAIR_PROMPTS + two_subjects.TINY_PAIR_PROMPTS:
        assert prompt.template.count("{a}") == prompt.template.count("{b}") == 1
        assert "{" not in prompt.without_subjects()


def test_manual_regions_are_the_left_and_right_halves():
    left, right = two_subjects.manual_regions(6, 8)
    assert left[:, :4].eq(1).all() and left[:, 4:].eq(0).all() and torch.equal(left + right, torch.ones(6, 8))


def test_the_pair_model_carries_both_subjects_on_their_words_with_their_halves(tmp_path):
    """The model sampled for a manual-regions job: one patch per layer holding both subjects, each at its
    word's position, with the left / right half as its region (what two chained Apply nodes make)."""
    from test_evaluation import SETTINGS
    from tiny_models import tiny_sdxl_clip

    from nested_attention_comfy.attention import comfy_attention
    from training.evaluation.method_images import Generator, Subject
    from training.models import sdxl as models_lib
    from training.presets import PRESETS

    frozen = models_lib.load_frozen(
        tiny=True, checkpoint=None, clip_vision_path=None, weight_dtype=None, seed=0
    )
    encoder = models_lib.make_encoder(
        domain="tiny",
        token="pet",
        qformer=PRESETS["tiny"].qformer,
        frozen=frozen,
        alpha=2.0,
        init_from_unet=True,
        seed=0,
    ).eval()
    subjects = [Subject(f"s{i}", "", torch.rand(32, 32, 3)) for i in range(2)]
    base = Generator(
        frozen=frozen,
        encoder=encoder,
        text=models_lib.TextEncoder(frozen.clip, "pet"),
        subjects=subjects,
        prompts=[],
        token="pet",
        settings=SETTINGS,
        host=comfy_attention,
    )
    generator = two_subjects.PairGenerator(base, [(0, 1)], two_subjects.TINY_PAIR_PROMPTS, ("pet", "toy"))
    model = generator.model(PairJob(PairMethod("nested", "manual", 2.0), 0, 0, 0))
    tokens = tiny_sdxl_clip().tokenize("a pet and a toy side by side")["g"][0]
    side = SETTINGS.resolution // 8
    left, right = two_subjects.manual_regions(side, side)
    patches = attn2_replacements(model)
    assert len(patches) == len(encoder.layers)
    for patch in patches.values():
        bound = {s.name: s for s in patch.subjects}
        assert set(bound) == {"pet", "toy"}
        assert [tokens[p][0] for p in bound["pet"].positions] == [tokens[2][0]]  # "a pet and a toy": 2nd word
        assert [tokens[p][0] for p in bound["toy"].positions] == [tokens[5][0]]
        assert torch.equal(bound["pet"].mask, left) and torch.equal(bound["toy"].mask, right)
        assert {s.lam for s in patch.subjects} == {2.0}
        assert torch.equal(bound["pet"].tokens, base.tokens(0)) and torch.equal(
            bound["toy"].tokens, base.tokens(1)
        )
    none = generator.model(PairJob(PairMethod("nested", "none", 1.0), 0, 0, 0))
    unbound = [s for p in attn2_replacements(none).values() for s in p.subjects]
    assert all(s.mask is None and not s.auto_region for s in unbound)
    auto = generator.model(PairJob(PairMethod("nested", "auto", 1.0), 0, 0, 0))
    for patch in attn2_replacements(auto).values():  # both words, no mask: regions found while sampling
        assert {s.name for s in patch.subjects} == {"pet", "toy"}
        assert all(s.auto_region and s.mask is None for s in patch.subjects)
    assert generator.model(PairJob(PairMethod("prior"), 0, 0, 0)) is frozen.unet


def test_two_subject_flags_that_do_not_fit_are_refused(tmp_path):
    for flags in (
        ["--domain", "pets", "--encoder", __file__, "--two_subjects"],  # no faces to score
        ["--domain", "tiny", "--regions", "manual"],  # without --two_subjects
        ["--domain", "tiny", "--two_subjects", "--pair_words", "man", "Man"],
    ):
        with pytest.raises(SystemExit):
            evaluate_config.parse_args([*flags, "--output_dir", str(tmp_path)])


def test_every_region_method_is_measured_by_default(tmp_path):
    args = evaluate_config.parse_args(["--domain", "tiny", "--output_dir", str(tmp_path), "--two_subjects"])
    assert args.regions == ("none", "manual", "auto")


def assert_identity_figures_recompute(out, saved, own, other):
    """Every row's identity figures, recomputed from its image on disk and the two subjects' photos."""
    detector = tiny_scorers.TinyIdentity()
    for entry in saved["rows"]:
        image = torch.from_numpy(np.asarray(Image.open(out / entry["image"]), dtype=np.float32) / 255)
        faces = detector.embed_faces(image)[:2]
        assert entry["faces_detected"] == len(faces)
        if entry["face_found"]:
            mine, theirs = (
                torch.from_numpy(np.asarray(Image.open(s["source"]).convert("RGB"), dtype=np.float32) / 255)
                for name in (entry["subject"], entry["other_subject"])
                for s in saved["settings"]["subjects"]
                if s["name"] == name
            )
            box = [int(v) for v in entry["face_box"].split(",")]
            embedding = next(e for b, e in faces if [b.left, b.top, b.right, b.bottom] == box)
            assert entry[own] == pytest.approx(
                float(metrics.cosine(embedding, detector.embed(mine))), abs=1e-9
            )
            assert entry[other] == pytest.approx(
                float(metrics.cosine(embedding, detector.embed(theirs))), abs=1e-9
            )
        else:
            assert entry[own] is None and entry[other] is None


def assert_summary_counts_face_failures(saved, own, other):
    """Four summary entries (prior + three regions), each counting its rows' missing faces."""
    summary = {(e["method"], e["region"]): e for e in saved["summary"]}
    assert set(summary) == {("prior", ""), ("nested", "none"), ("nested", "manual"), ("nested", "auto")}
    for entry in saved["summary"]:
        assert entry["rows"] == 4 and entry["face_failures"] == sum(
            1
            for r in saved["rows"]
            if (r["method"], r["region"]) == (entry["method"], entry["region"]) and not r["face_found"]
        )
        if entry[own] is not None:
            assert entry["identity_gap"] == pytest.approx(entry[own] - entry[other])


def test_cli_two_subjects_writes_leakage_rows_summary_plot_and_grids(tmp_path):
    out = tmp_path / "pairs"
    try:
        result = evaluate_cli.main(
            evaluate_config.parse_args(
                ["--domain", "tiny", "--steps", "2", "--output_dir", str(out), "--two_subjects",
                 "--lambdas", "1"]
            )
        )
    finally:
        reset_after_run()
    # 1 pair (the 2 generated subjects), 2 prompts, 1 seed: the prior's 2 images + 3 region methods x 2.
    images = sorted(out.glob("images/**/*.png"))
    assert result["generated"] == len(images) == 2 + 3 * 2
    own, other = "identity_own[tiny-face]", "identity_other[tiny-face]"
    assert result["metrics"] == ["clip_t[tiny-clip-g+tiny-vision]", own, other]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    saved = json.loads((out / "metrics.json").read_text())
    assert len(rows) == len(saved["rows"]) == 8 * 2  # each image: one row per subject of the pair
    assert {(r["method"], r["region"]) for r in rows} == {
        ("prior", ""),
        ("nested", "none"),
        ("nested", "manual"),
        ("nested", "auto"),
    }
    assert all(r["word"] in ("pet", "toy") and r["subject"] != r["other_subject"] for r in rows)
    assert_identity_figures_recompute(out, saved, own, other)
    assert_summary_counts_face_failures(saved, own, other)
    with open(out / "summary.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
    with Image.open(out / "leakage.png") as plot:
        assert plot.size[0] > 400 and plot.size[1] > 300
    assert sorted(p.name for p in (out / "grids").glob("*.png")) == [
        "pair-auto-lambda-1.png",
        "pair-manual-lambda-1.png",
        "pair-none-lambda-1.png",
        "prior.png",
    ]
    # The regions change the image: manual differs from none for the same pair, prompt and seed. (auto finds
    # its regions in the first step and uses them from the second, whose sigma is already near 0 with 2 steps:
    # tests/test_auto_region.py shows the regions act through the sampler.)
    none, manual = (
        np.asarray(
            Image.open(
                out / f"images/pair-{r}-lambda-1/{'+'.join(saved['settings']['pairs'][0])}/p00-seed0.png"
            ),
            dtype=np.float64,
        )
        for r in ("none", "manual")
    )
    assert np.abs(none - manual).mean() > 0.5
    assert saved["settings"]["two_subjects"] is True and saved["settings"]["pair_words"] == ["pet", "toy"]
