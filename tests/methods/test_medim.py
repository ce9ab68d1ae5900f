"""medim: the positional word atlas, the finding loss on the lesion prior, no-report fallback, KDM / SDM, hooks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raymim.masking.report_guided import report_guided_masking
from raymim.methods import build_method
from raymim.methods.medim import finding_groups, finding_loss, position_code, word_region_sims
from raymim.models.text import ReportTokenizer

from .conftest import tiny_config
from .phantoms import disjoint_reports, named_sites, phantom_batch


def medim(**method: object):
    return build_method("medim", tiny_config("medim", text_dim=32, text_max_len=32, **method))


def prior(n: int, seed: int = 0) -> torch.Tensor:
    """A lesion_prob grid as the shards store it (4^3-voxel prior patches of a 32^3 crop: [n, 8, 8, 8])."""
    return torch.rand(n, 8, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["kdm", "sdm"])
def test_modes_mask_exactly_and_train_the_attention(mode: str):
    torch.manual_seed(0)
    img, _, reports = phantom_batch(4)
    method = medim(mask_ratio=0.5, medim_mode=mode)
    out = method({"image": img, "report": reports, "lesion_prob": prior(4)})
    assert out.metrics["mask_ratio"] == 0.5 and out.metrics["no_report_frac"] == 0.0
    assert out.metrics["loss_local"] > 0 and out.metrics["loss_global"] > 0
    out.loss.backward()
    for module in (method.text_encoder, method.key_proj, method.encoder.patch_embedding):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert method.prior_scale.grad.abs() > 0


def test_the_attention_is_a_positional_atlas_that_only_the_alignment_trains():
    """The mask map depends on the report alone; the finding loss reaches no encoder parameter, and the
    reconstruction loss does not move the map (the keys are MedIM's fixed position code)."""
    torch.manual_seed(0)
    img, _, reports = phantom_batch(4)
    method = medim(mask_ratio=0.25, medim_low_share=0.0)
    r = method.report_attention([reports[0]] * 3 + [reports[1]])  # no image goes in
    assert torch.equal(r["map"][:3], r["map"][:1].expand(3, -1))  # the same report: the same map
    assert not torch.equal(r["map"][0], r["map"][3])  # another report: another map
    assert not any(p is method.position for p in method.parameters()) and "position" not in method.state_dict()

    # The finding loss alone trains the text encoder, key_proj and the logit scale, nothing of the encoder.
    r = method.report_attention(reports)
    method.local_loss(r, method.prior_tokens(prior(4))).backward()
    assert method.key_proj.weight.grad.abs().sum() > 0 and method.prior_scale.grad.abs() > 0
    assert all(p.grad is None for p in method.encoder.parameters())

    # A reconstruction-only step (alignment weight 0) trains the encoder but leaves the mask map as it was.
    method = medim(medim_align_weight=0.0)
    opt = torch.optim.SGD(method.parameters(), lr=10.0)
    with torch.no_grad():
        before = method.report_attention(reports)["map"]
    pos = method.encoder.patch_embedding.position_embeddings.detach().clone()
    method({"image": img, "report": reports, "lesion_prob": prior(4)}).loss.backward()
    opt.step()
    assert not torch.equal(pos, method.encoder.patch_embedding.position_embeddings)  # MAE did train the encoder
    with torch.no_grad():
        assert torch.equal(method.report_attention(reports)["map"], before)


def test_position_code_is_fixed_and_tells_every_token_apart():
    code = position_code((4, 4, 4))
    assert code.shape == (64, 96) and not code.requires_grad
    assert torch.equal(code, position_code([4, 4, 4]))
    assert torch.cdist(code, code).add(torch.eye(64) * 1e3).min() > 0.1  # no two tokens share a code


def test_finding_score_is_the_lesion_prior_under_the_attention():
    torch.manual_seed(0)
    attn = torch.randn(3, 2, 64).softmax(-1)
    prob = torch.rand(3, 64)
    assert torch.allclose(word_region_sims(attn, prob), torch.einsum("iql,jl->ijq", attn, prob))
    method = medim()
    assert math.isclose(float(method.prior_scale.detach().exp()), 20 * 0.2, rel_tol=1e-6)  # 20 tau
    # One finding shared by reports 0 and 1, another in report 2 alone; images 0 and 1 are lesion-like
    # at token 5, image 2 at token 40. Each finding attending where its own images are scores lower
    # than the swapped attention.
    reports = ["A nodule in the left lung.", "A nodule in the left lung.", "A cyst in the right kidney."]
    enc = ReportTokenizer(max_len=16)(reports)
    groups = finding_groups(enc.keyword, enc.sentence, enc.sentence, enc.keyword >= 0)
    prob = torch.zeros(3, 64)
    prob[:2, 5], prob[2, 40] = 1.0, 1.0
    own, swapped = torch.zeros(3, 16, 64), torch.zeros(3, 16, 64)
    own[:2, :, 5], own[2, :, 40], swapped[:2, :, 40], swapped[2, :, 5] = 1.0, 1.0, 1.0, 1.0
    scored = [float(finding_loss(word_region_sims(a, prob), *groups, 0.1)) for a in (own, swapped)]
    assert scored[0] < 0.1 < math.log(3) < scored[1]


def test_rows_without_a_report_fall_back_to_random_masking():
    img, _, reports = phantom_batch(4)
    batch = {"image": img, "report": [reports[0], None, "  ", reports[3]], "lesion_prob": prior(4)}
    method = medim(mask_ratio=0.25, medim_low_share=0.0)
    out = method(batch)
    assert out.metrics["no_report_frac"] == 0.5 and out.metrics["mask_ratio"] == 0.25
    # Report rows: exactly the most-attended tokens (low_share 0), whatever the seed.
    with torch.no_grad():
        r = method.report_attention([reports[0], reports[3]])
    has = torch.tensor([True, False, False, True])
    attn = torch.full((4, 64), 1 / 64)
    attn[[0, 3]] = r["map"]
    m0 = report_guided_masking(attn, 0.25, 0.0, has, generator=torch.Generator().manual_seed(0)).mask
    m1 = report_guided_masking(attn, 0.25, 0.0, has, generator=torch.Generator().manual_seed(1)).mask
    top = torch.zeros(2, 64).scatter(1, r["map"].topk(16, dim=1).indices, 1.0)
    assert torch.equal(m0[[0, 3]], top) and torch.equal(m1[[0, 3]], top)
    assert not torch.equal(m0[[1, 2]], m1[[1, 2]])  # random for the rows with no report
    # No reports at all: plain random masking, no alignment term, no prior needed.
    out = method({"image": img})
    assert out.metrics["no_report_frac"] == 1.0 and out.metrics["loss_align"] == 0.0


def test_reports_without_the_lesion_prior_are_a_clear_error():
    img, _, reports = phantom_batch(2)
    with pytest.raises(ValueError, match=r"lesion_prob .*prepare\.lesion_prior=true") as info:
        medim()({"image": img, "report": reports})
    assert "\n" not in str(info.value)


def test_keyword_file_sets_the_vocabulary(tmp_path):
    vocab = tmp_path / "terms.txt"
    vocab.write_text("# organs\nkidney\npleural effusion  # matched on its last word\nkidney\n")
    method = medim(medim_vocab=str(vocab))
    assert method.tokenizer.keywords == ("kidney", "effusion")
    reports = ["A 5 mm lesion in the right kidney.", "Small left pleural effusion.", "No focal lesion."]
    enc = method.tokenizer(reports)
    words = [[w for w, k in zip(r.lower().replace(".", "").split(), enc.keyword[i].tolist()) if k >= 0]
             for i, r in enumerate(reports)]
    assert words == [["kidney"], ["effusion"], []]
    img, _, _ = phantom_batch(3)
    out = method({"image": img, "report": reports, "lesion_prob": prior(3)})  # a report with no keyword still masks
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

    method = medim()
    method.text_encoder = Frozen(32)
    img, _, reports = phantom_batch(2)
    out = method({"image": img, "report": reports, "lesion_prob": prior(2)})
    out.loss.backward()
    assert method.text_encoder.calls == 1 and method.text_encoder.table.weight.grad is not None


@pytest.mark.parametrize("mode", ["kdm", "sdm"])
def test_finding_loss_counts_shared_findings_as_positives(mode: str):
    """Each finding sentence picks every image whose report holds the same keywords."""
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
    assert finding_loss(sims, row, weight, torch.ones_like(positive), 0.2).item() == 0.0
    no_findings = finding_groups(enc.keyword[:, :1], enc.sentence[:, :1], q_sentence[:, :1], q_valid[:, :1])
    assert finding_loss(sims, *no_findings, 0.2).item() == 0.0

    # Through the method: the loss trains the text encoder and the key projection.
    torch.manual_seed(0)
    img, _, phantom_reports = phantom_batch(4)
    method = medim(medim_mode=mode)
    r = method.report_attention(phantom_reports)
    loss = method.local_loss(r, method.prior_tokens(prior(4)))
    assert loss > 0
    loss.backward()
    for module in (method.text_encoder, method.key_proj):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_disjoint_control_reports_name_other_organs_of_the_same_site():
    """The grounding test's control: a same-site report that names none of the own organ + side pairs."""
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
