"""medim: the word-region score, no-report fallback, KDM / SDM masks, keyword file, text-encoder hook."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raymim.masking.report_guided import report_guided_masking
from raymim.methods import build_method
from raymim.methods.medim import (
    _symmetric_ce,
    finding_groups,
    finding_loss,
    patch_statistics,
    same_domain,
    word_region_scores,
    word_region_sims,
)
from raymim.models.text import ReportTokenizer

from .conftest import tiny_config
from .phantoms import disjoint_reports, named_sites, phantom_batch


def test_image_independent_attention_scores_at_chance():
    """The degenerate solution of the old loss (same regions whatever the image) earns nothing."""
    torch.manual_seed(0)
    q, valid = torch.randn(4, 3, 16), torch.ones(4, 3, dtype=torch.bool)
    keys = torch.randn(1, 64, 16).expand(4, -1, -1)  # every image looks the same to the words
    scores = word_region_scores(q, valid, keys)
    assert torch.allclose(scores, scores[:, :1].expand_as(scores), atol=1e-6)  # S[i, j] constant in j
    report_to_image = torch.nn.functional.cross_entropy(scores / 0.2, torch.arange(4))
    assert report_to_image.item() == pytest.approx(math.log(4))  # chance
    # Image-specific content that matches the report's words makes the diagonal win.
    keys = torch.randn(4, 64, 16)
    for w in range(3):  # image i holds a patch that matches each of report i's words
        keys[torch.arange(4), torch.arange(4) * 5 + 20 * w] = 10.0 * q[:, w]
    scores = word_region_scores(q, valid, keys)
    assert (scores.argmax(1) == torch.arange(4)).all()


@pytest.mark.parametrize("mode", ["kdm", "sdm"])
def test_modes_mask_exactly_and_train_the_attention(mode: str):
    torch.manual_seed(0)
    img, _, reports = phantom_batch(4)
    method = build_method("medim", tiny_config("medim", mask_ratio=0.5, medim_mode=mode, text_dim=32, text_max_len=32))
    out = method({"image": img, "report": reports})
    assert out.metrics["mask_ratio"] == 0.5 and out.metrics["no_report_frac"] == 0.0
    assert out.metrics["loss_local"] > 0 and out.metrics["loss_global"] > 0
    out.loss.backward()
    for module in (method.text_encoder, method.key_proj, method.encoder.patch_embedding):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_rows_without_a_report_fall_back_to_random_masking():
    img, _, reports = phantom_batch(4)
    batch = {"image": img, "report": [reports[0], None, "  ", reports[3]]}
    method = build_method("medim", tiny_config("medim", mask_ratio=0.25, medim_low_share=0.0))
    out = method(batch)
    assert out.metrics["no_report_frac"] == 0.5 and out.metrics["mask_ratio"] == 0.25
    # Report rows: exactly the most-attended tokens (low_share 0), whatever the seed.
    with torch.no_grad():
        r = method.report_attention(img[[0, 3]], [reports[0], reports[3]])
    has = torch.tensor([True, False, False, True])
    attn = torch.full((4, 64), 1 / 64)
    attn[[0, 3]] = r["map"]
    m0 = report_guided_masking(attn, 0.25, 0.0, has, generator=torch.Generator().manual_seed(0)).mask
    m1 = report_guided_masking(attn, 0.25, 0.0, has, generator=torch.Generator().manual_seed(1)).mask
    top = torch.zeros(2, 64).scatter(1, r["map"].topk(16, dim=1).indices, 1.0)
    assert torch.equal(m0[[0, 3]], top) and torch.equal(m1[[0, 3]], top)
    assert not torch.equal(m0[[1, 2]], m1[[1, 2]])  # random for the rows with no report
    # No reports at all: plain random masking, no alignment term.
    out = method({"image": img})
    assert out.metrics["no_report_frac"] == 1.0 and out.metrics["loss_align"] == 0.0


def test_keyword_file_sets_the_vocabulary(tmp_path):
    vocab = tmp_path / "terms.txt"
    vocab.write_text("# organs\nkidney\npleural effusion  # matched on its last word\nkidney\n")
    method = build_method("medim", tiny_config("medim", medim_vocab=str(vocab), text_dim=32, text_max_len=32))
    assert method.tokenizer.keywords == ("kidney", "effusion")
    reports = ["A 5 mm lesion in the right kidney.", "Small left pleural effusion.", "No focal lesion."]
    enc = method.tokenizer(reports)
    words = [[w for w, k in zip(r.lower().replace(".", "").split(), enc.keyword[i].tolist()) if k >= 0]
             for i, r in enumerate(reports)]
    assert words == [["kidney"], ["effusion"], []]
    img, _, _ = phantom_batch(3)
    out = method({"image": img, "report": reports})  # a report with no keyword still trains / masks
    assert math.isfinite(out.loss.item()) and out.metrics["mask_ratio"] == 0.75
    with pytest.raises(ValueError, match="medim_vocab"):
        empty = tmp_path / "empty.txt"
        empty.write_text("# nothing\n")
        build_method("medim", tiny_config("medim", medim_vocab=str(empty)))


def test_text_encoder_can_be_replaced():
    class Frozen(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.table = nn.Embedding(5000, dim)
            self.calls = 0

        def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.table(ids % 5000)

    method = build_method("medim", tiny_config("medim", text_dim=32, text_max_len=32))
    method.text_encoder = Frozen(32)
    img, _, reports = phantom_batch(2)
    out = method({"image": img, "report": reports})
    out.loss.backward()
    assert method.text_encoder.calls == 1 and method.text_encoder.table.weight.grad is not None


def test_domain_negatives_compare_reports_and_images_within_a_domain():
    """medim_negatives="domain": only same-domain pairs are negatives, so site cues cannot score."""
    allowed = same_domain(["site0", "site1", "site0", None])
    assert allowed.tolist() == [[True, False, True, False], [False, True, False, False],
                                [True, False, True, False], [False, False, False, True]]
    assert same_domain(None) is None and same_domain(["a", "a"]) is None  # one domain: the whole batch
    torch.manual_seed(0)
    logits = torch.randn(4, 4)
    blocks = same_domain(["a", "b", "a", "b"])
    per_block = [_symmetric_ce(logits[idx][:, idx]) for idx in ([0, 2], [1, 3])]
    assert _symmetric_ce(logits, blocks).item() == pytest.approx(sum(per_block).item() / 2, rel=1e-6)

    img, _, reports = phantom_batch(4)
    cfg = tiny_config("medim", medim_negatives="domain", text_dim=32, text_max_len=32)
    torch.manual_seed(0)
    method = build_method("medim", cfg)
    alone = method({"image": img, "report": reports, "domain": ["s0", "s1", "s2", "s3"]})
    assert alone.metrics["loss_local"] == 0.0 and alone.metrics["loss_global"] == 0.0  # no negatives
    torch.manual_seed(1)
    shared = method({"image": img, "report": reports, "domain": ["s0"] * 4})
    torch.manual_seed(1)
    no_column = method({"image": img, "report": reports})
    assert shared.metrics["loss_local"] > 0 and shared.metrics["loss_local"] == no_column.metrics["loss_local"]
    with pytest.raises(ValueError, match="medim_negatives"):
        tiny_config("medim", medim_negatives="site")


def test_stat_keys_single_out_both_lesion_polarities():
    """medim_keys="stats": a darker and a brighter blob both stand out in |dev| (a linear embedding cannot)."""
    noise = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    img = 0.5 + 0.01 * noise
    img[0, :, 10:14, 10:14, 10:14] -= 0.05  # hypodense, token (1, 1, 1)
    img[1, :, 18:22, 2:6, 26:30] += 0.05  # hyperdense, token (2, 0, 3)
    stats = patch_statistics(img, 8)
    assert stats.shape == (2, 64, 4)
    assert torch.allclose(stats.mean(1), torch.zeros(2, 4), atol=1e-5)  # z-scored per image
    for n, token in ((0, 1 * 16 + 1 * 4 + 1), (1, 2 * 16 + 0 * 4 + 3)):
        assert stats[n, :, 1].argmax() == token and stats[n, :, 3].argmax() == token  # std and |dev|
    assert stats[0, 21, 2] < 0 < stats[1, 35, 2]  # the signed deviation keeps the polarity
    method = build_method("medim", tiny_config("medim", medim_keys="stats", text_dim=32, text_max_len=32))
    _, _, reports = phantom_batch(2)
    out = method({"image": img, "report": reports})
    out.loss.backward()
    assert method.stat_proj.weight.grad is not None and method.stat_proj.weight.grad.abs().sum() > 0


def test_prior_keys_and_separate_values():
    """medim_keys="prior": the batch's MPS lesion_prob enters the keys where it is high; medim_values="separate"."""
    torch.manual_seed(0)
    img, _, reports = phantom_batch(4)
    method = build_method("medim", tiny_config("medim", medim_keys="prior", medim_values="separate",
                                               text_dim=32, text_max_len=32))
    prob = torch.zeros(4, 8, 8, 8)  # stored on the 4^3-voxel prior grid; the model's tokens are 8^3 voxels
    prob[:, 2, 5, 6] = 0.9  # -> token (1, 2, 3) of the 4 x 4 x 4 grid
    with torch.no_grad():
        base, values = method.patch_keys(img, torch.zeros_like(prob))
        keys, values2 = method.patch_keys(img, prob)
    changed = (keys - base).abs().sum(-1) > 1e-6  # [4, 64]
    assert changed.sum() == 4 and changed[:, 1 * 16 + 2 * 4 + 3].all()
    assert torch.allclose(values, values2) and not torch.allclose(values, keys)  # values skip the prior term
    out = method({"image": img, "report": reports, "lesion_prob": prob})
    assert out.metrics["medim_prior_missing"] == 0.0
    out.loss.backward()
    for module in (method.prior_proj, method.value_proj):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert method({"image": img, "report": reports}).metrics["medim_prior_missing"] == 1.0  # no column
    # The word-region score pools the values: different values, different scores; None = the keys.
    q, valid = torch.randn(4, 3, 32), torch.ones(4, 3, dtype=torch.bool)
    assert torch.equal(word_region_scores(q, valid, keys), word_region_scores(q, valid, keys, keys))
    assert not torch.allclose(word_region_scores(q, valid, keys), word_region_scores(q, valid, keys, values))
    with pytest.raises(ValueError, match="medim_values"):
        tiny_config("medim", medim_values="tokens")


@pytest.mark.parametrize("mode", ["kdm", "sdm"])
def test_finding_loss_counts_shared_findings_as_positives(mode: str):
    """medim_local="finding": each finding sentence picks every image whose report holds the same keywords."""
    reports = ["CT. A 5 mm nodule in the left lung. A 20 mm hypodense lesion in the right liver.",
               "CT. A 9 mm nodule in the left lung.",  # same finding as report 0's first (size is no keyword)
               "CT. A 7 mm nodule in the right lung.",
               "CT. No focal lesion."]
    enc = ReportTokenizer(max_len=32)(reports)
    if mode == "kdm":
        q_sentence, q_valid = enc.sentence, enc.keyword >= 0
    else:  # one query each: the first sentence naming a keyword (sentence 1 in every report)
        q_sentence, q_valid = torch.ones(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.bool)
    row, weight, positive = finding_groups(enc.keyword, enc.sentence, q_sentence, q_valid)
    if mode == "kdm":
        assert row.tolist() == [0, 0, 1, 2, 3]  # "CT." names no keyword: no finding
        assert weight.sum(1).tolist() == [3.0, 4.0, 3.0, 3.0, 1.0]  # nodule left lung / hypodense lesion right liver
    else:
        assert row.tolist() == [0, 1, 2, 3] and weight.sum(1).tolist() == [1.0] * 4
    by_row = {int(r): p.tolist() for r, p in zip(row.flip(0), positive.flip(0), strict=True)}  # first finding per row
    assert by_row[0] == [True, True, False, False] and by_row[1] == [True, True, False, False]
    assert by_row[2] == [False, False, True, False] and by_row[3] == [False, False, False, True]

    # Scores that rank each finding's positives first give a lower loss than the reverse, and a
    # finding whose candidates are all positives adds nothing.
    q = q_valid.shape[1]
    sims = torch.zeros(4, 4, q)
    for g in range(len(row)):  # every query of finding g: 1 for the images holding it, 0 for the others
        sims[row[g], :, weight[g] > 0] = positive[g].float()[:, None]
    assert finding_loss(sims, row, weight, positive, 0.2) < finding_loss(-sims, row, weight, positive, 0.2)
    chance = finding_loss(torch.zeros(4, 4, q), row, weight, positive, 0.2)
    expected = [math.log(4 / int(p.sum())) for p in positive]
    assert chance.item() == pytest.approx(sum(expected) / len(expected))
    alone = torch.eye(4, dtype=torch.bool)  # every image in its own domain: no negatives
    assert finding_loss(sims, row, weight, positive, 0.2, alone).item() == 0.0
    no_findings = finding_groups(enc.keyword[:, :1], enc.sentence[:, :1], q_sentence[:, :1], q_valid[:, :1])
    assert finding_loss(sims, *no_findings, 0.2).item() == 0.0

    # Through the method: the loss trains the text encoder and the patch keys.
    torch.manual_seed(0)
    img, _, phantom_reports = phantom_batch(4)
    method = build_method("medim", tiny_config("medim", medim_local="finding", medim_mode=mode,
                                               text_dim=32, text_max_len=32))
    out = method({"image": img, "report": phantom_reports})
    assert out.metrics["loss_local"] > 0
    out.loss.backward()
    for module in (method.text_encoder, method.key_proj):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    sims = word_region_sims(torch.randn(4, 3, 32), torch.randn(4, 64, 32))
    assert sims.shape == (4, 4, 3) and sims.abs().max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="medim_local"):
        tiny_config("medim", medim_local="word")


def test_prior_position_keys_see_only_where_and_how_lesion_like():
    """medim_keys="prior_position": keys are position + MPS lesion_prob, blind to other image content."""
    torch.manual_seed(0)
    img, _, reports = phantom_batch(2)
    method = build_method("medim", tiny_config("medim", medim_keys="prior_position", text_dim=32, text_max_len=32))
    prob = torch.zeros(2, 8, 8, 8)
    prob[1, 2, 5, 6] = 0.9  # -> token (1, 2, 3) of image 1
    with torch.no_grad():
        keys, values = method.patch_keys(img, prob)
        bright, _ = method.patch_keys(img.flip(0) + 0.3, prob)
    assert torch.equal(keys, bright)  # other image content does not reach the keys
    changed = (keys[1] - keys[0]).abs().sum(-1) > 1e-6
    assert changed.sum() == 1 and changed[1 * 16 + 2 * 4 + 3]
    assert torch.equal(values, keys)  # medim_values="keys": the region pools the same features
    out = method({"image": img, "report": reports, "lesion_prob": prob})
    assert out.metrics["medim_prior_missing"] == 0.0
    out.loss.backward()
    assert method.prior_proj.weight.grad.abs().sum() > 0
    assert method.encoder.patch_embedding.position_embeddings.grad.abs().sum() > 0


def test_position_keys_with_prior_values():
    """medim_keys="position", medim_values="prior": the attention is one learned map per word (no image
    content, no prior); what the word-region score compares is how lesion-like the attended region is."""
    torch.manual_seed(0)
    img, _, reports = phantom_batch(2)
    method = build_method("medim", tiny_config("medim", medim_keys="position", medim_values="prior",
                                               text_dim=32, text_max_len=32))
    prob = torch.zeros(2, 8, 8, 8)
    prob[1, 2, 5, 6] = 0.9  # -> token (1, 2, 3) of image 1
    with torch.no_grad():
        keys, values = method.patch_keys(img, prob)
        other_keys, _ = method.patch_keys(img.flip(0) + 0.3, torch.rand_like(prob))
        _, no_prior = method.patch_keys(img, None)
    assert torch.equal(keys, other_keys) and torch.equal(keys[0], keys[1])  # the same keys in every image
    changed = (values[1] - values[0]).abs().sum(-1) > 1e-6
    assert changed.sum() == 1 and changed[1 * 16 + 2 * 4 + 3]  # values differ only where the prior does
    assert torch.equal(no_prior, keys)  # without the column the values fall back to the keys
    out = method({"image": img, "report": reports, "lesion_prob": prob})
    assert out.metrics["medim_prior_missing"] == 0.0
    out.loss.backward()
    assert method.prior_proj.weight.grad.abs().sum() > 0
    assert method.key_proj.weight.grad.abs().sum() > 0
    assert method({"image": img, "report": reports}).metrics["medim_prior_missing"] == 1.0
    with pytest.raises(ValueError, match="medim_keys"):
        tiny_config("medim", medim_keys="where")
    # Keys shared by every image: the one-attention-per-report path gives the same sims.
    q, shared, values = torch.randn(3, 4, 32), torch.randn(1, 64, 32), torch.randn(3, 64, 32)
    fast = word_region_sims(q, shared, values)
    assert torch.allclose(fast, word_region_sims(q, shared.expand(3, -1, -1), values), atol=1e-6)
    assert torch.allclose(word_region_sims(q, shared), word_region_sims(q, shared.expand(3, -1, -1)), atol=1e-6)


def test_prior_score_values_score_the_attended_lesion_prob():
    """medim_values="prior_score": a word's score for an image is the lesion_prob under its attention
    (no cosine, no prior projection); the loss trains the attention and a logit scale."""
    torch.manual_seed(0)
    img, _, reports = phantom_batch(2)
    method = build_method("medim", tiny_config("medim", medim_keys="position", medim_values="prior_score",
                                               medim_local="finding", text_dim=32, text_max_len=32))
    assert method.prior_proj is None and math.isclose(float(method.prior_scale.detach().exp()), 20 * 0.2, rel_tol=1e-6)
    prob = torch.rand(2, 4, 4, 4)  # the token grid of the tiny 32^3 / patch-8 model
    keys, values = method.patch_keys(img, prob)
    assert values.shape == (2, 64, 1) and torch.equal(values[..., 0], prob.reshape(2, 64))
    assert not method.patch_keys(img, None)[1].any()  # no column: every image scores 0
    q = torch.randn(2, 3, 32)
    attn = torch.einsum("iqd,ld->iql", q, keys[0]).div(32**0.5).softmax(-1)
    expected = torch.einsum("iql,jl->ijq", attn, values[..., 0])
    assert torch.allclose(word_region_sims(q, keys[:1], values), expected, atol=1e-6)
    out = method({"image": img, "report": reports, "lesion_prob": prob})
    out.loss.backward()
    assert out.metrics["loss_local"] > 0
    assert method.prior_scale.grad.abs() > 0 and method.key_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="medim_values"):
        tiny_config("medim", medim_values="score")


def test_disjoint_control_reports_name_other_organs_of_the_same_site():
    """The grounding bench's control: a same-site report that names none of the own organ + side pairs."""
    _, _, reports = phantom_batch(48, 16, seed=11)
    control = disjoint_reports(reports)
    for i, (own, other) in enumerate(zip(reports, control, strict=True)):
        assert not named_sites(own) & named_sites(other)
        if reports.count(other) == 1:  # ("No focal lesion." recurs)
            j = reports.index(other)
            assert j % 3 == i % 3 and j != i  # phantom_batch cycles the sites
    assert sum(bool(named_sites(r)) for r in reports) > 30
    with pytest.raises(ValueError, match="draw more phantoms"):
        disjoint_reports(["A nodule in the left lung."] * 3)
