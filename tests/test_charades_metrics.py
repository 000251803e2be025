"""charades.py without decoding: annotation readers, targets, official metrics, submission files, scoring command."""
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

import charades
from charades import (CharadesFormatError, CharadesVideo, classify_map, frame_map, localize_map,
                      localization_points, read_charades_csv, read_classes, score_submission)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"


def write_csv(path, rows, header=HEADER):
    """Write an official-format Charades CSV; rows are (id, actions, length) with the other fields filled in."""
    lines = [header]
    for vid, actions, length in rows:
        lines.append(f'{vid},HR43,Kitchen,6,7,Yes,"A person cooks, then looks out.",food;stove,'
                     f'"A person cooks food.",{actions},{length}')
    path.write_text("\n".join(lines) + "\n")
    return path


def write_classes(path, n):
    """Write a Charades_v1_classes.txt-style file with n classes."""
    path.write_text("".join(f"c{i:03d} Doing thing number {i}\n" for i in range(n)))
    return path


def run_cli(*args, cwd):
    """Run `python charades.py ...` in a subprocess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "charades.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------------------------- readers

def test_read_csv_official_format(tmp_path):
    text = (HEADER + "\n"
            '46GP8,HR43,Kitchen,6,7,Yes,"A person cooking, on a stove.",food;stove;window,'
            '"A person cooks food on a stove before looking out of a window.",c092 11.90 21.20;c147 0.00 12.60,24.83\n'
            'N11GT,0KZ7,Stairs,6,7,Yes,"One person opens a door.\nThen leaves.",door,"",,8.5\n'
            '\n'
            '0IH69,6RE8,Bedroom,,,No,"x",,"y","c001 1 2",30\n')
    path = tmp_path / "Charades_v1_test.csv"
    path.write_text(text)
    videos = read_charades_csv(path)
    assert [v.id for v in videos] == ["46GP8", "N11GT", "0IH69"]
    assert videos[0].actions == [(92, 11.9, 21.2), (147, 0.0, 12.6)]
    assert videos[0].length == 24.83 and videos[0].classes == {92, 147}
    assert videos[1].actions == [] and videos[1].length == 8.5
    # the quoted script of N11GT spans lines 3-4 and line 5 is blank, so 0IH69 starts on line 6
    assert [v.line for v in videos] == [2, 3, 6]
    assert videos[2].actions == [(1, 1.0, 2.0)] and videos[2].path == str(path)


def test_read_csv_with_class_list(tmp_path):
    classes = read_classes(write_classes(tmp_path / "classes.txt", 5))
    assert classes[3] == ("c003", "Doing thing number 3") and len(classes) == 5
    reordered = [("c004", "d"), ("c000", "a")]
    path = write_csv(tmp_path / "a.csv", [("v1", "c004 1 2;c000 3 4", 10)])
    assert read_charades_csv(path, reordered)[0].actions == [(0, 1.0, 2.0), (1, 3.0, 4.0)]
    assert read_charades_csv(path, tmp_path / "classes.txt")[0].classes == {4, 0}


@pytest.mark.parametrize("actions,length,expect", [
    ("c001 5.0 3.0", 10, ["line 3", "video v2", "end 3.0 < start 5.0"]),
    ("c001 1.0", 10, ["line 3", "video v2", "expected 'cNNN start end'"]),
    ("x12 1 2", 10, ["line 3", "video v2", "unknown class 'x12'"]),
    ("c001 1 abc", 10, ["line 3", "end is not a finite number: 'abc'"]),
    ("c001 1 2", "abc", ["line 3", "video v2", "length is not a finite number: 'abc'"]),
    ("c001 1 2", 0, ["line 3", "length must be > 0"]),
])
def test_read_csv_bad_rows(tmp_path, actions, length, expect):
    path = write_csv(tmp_path / "bad.csv", [("v1", "", 5), ("v2", actions, length)])
    with pytest.raises(CharadesFormatError) as e:
        read_charades_csv(path)
    for text in [str(path)] + expect:
        assert text in str(e.value)


def test_read_csv_unknown_class_in_class_list(tmp_path):
    path = write_csv(tmp_path / "a.csv", [("v1", "c001 1 2;c999 3 4", 5)])
    with pytest.raises(CharadesFormatError, match=r"a\.csv, line 2 \(video v1\): action 2 'c999 3 4': "
                                                  r"unknown class 'c999' \(not in the class list\)"):
        read_charades_csv(path, write_classes(tmp_path / "c.txt", 10))


def test_read_csv_bad_files(tmp_path):
    missing = write_csv(tmp_path / "m.csv", [], header=HEADER.replace(",length", ""))
    with pytest.raises(CharadesFormatError, match=r"m\.csv, line 1: missing column\(s\) length; found id,"):
        read_charades_csv(missing)
    dup = write_csv(tmp_path / "d.csv", [("v1", "", 5), ("v1", "", 6)])
    with pytest.raises(CharadesFormatError, match=r"d\.csv, line 3 \(video v1\): duplicate id, first on line 2"):
        read_charades_csv(dup)
    short = tmp_path / "s.csv"
    short.write_text(HEADER + "\nv1,a,b\n")
    with pytest.raises(CharadesFormatError, match=r"s\.csv, line 2: expected 11 fields, found 3"):
        read_charades_csv(short)
    with pytest.raises(CharadesFormatError, match=r"h\.csv: no videos"):
        read_charades_csv(write_csv(tmp_path / "h.csv", []))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_charades_csv(tmp_path / "nope.csv")


def test_read_classes_bad(tmp_path):
    bad = tmp_path / "c.txt"
    bad.write_text("c000 Holding some clothes\nc001\n")
    with pytest.raises(CharadesFormatError, match=r"c\.txt, line 2: expected 'cNNN description', found 'c001'"):
        read_classes(bad)
    bad.write_text("c000 a\nc001 b\nc000 c\n")
    with pytest.raises(CharadesFormatError, match=r"line 3: class 'c000' already defined on line 1"):
        read_classes(bad)
    bad.write_text("\n")
    with pytest.raises(CharadesFormatError, match="no classes found"):
        read_classes(bad)


# ---------------------------------------------------------------------------------------------- targets

VIDEO = CharadesVideo("v", 30.0, [(1, 2.0, 4.0), (2, 6.0, 8.0), (3, 10.0, 12.0)], line=7, path="x.csv")


def test_span_targets_union_inclusive():
    assert np.flatnonzero(charades.span_targets(VIDEO, 4.0, 6.0, 5)).tolist() == [1, 2]
    assert np.flatnonzero(charades.span_targets(VIDEO, 0.0, 30.0, 5)).tolist() == [1, 2, 3]
    assert not charades.span_targets(VIDEO, 4.5, 5.5, 5).any()
    assert charades.span_targets(VIDEO, 0, 1, 5).dtype == np.float32
    with pytest.raises(ValueError, match="t1 1.0 < t0 2.0"):
        charades.span_targets(VIDEO, 2.0, 1.0, 5)
    with pytest.raises(CharadesFormatError, match=r"x\.csv, line 7 \(video v\): class index 3 out of range for 3"):
        charades.span_targets(VIDEO, 0.0, 1.0, 3)


def test_frame_targets_bounds():
    times = [2.0, 3.0, 4.0, 5.0, 6.0]
    inclusive = charades.frame_targets(VIDEO, times, 4)
    assert inclusive.shape == (4, 5) and inclusive.dtype == np.float32
    assert inclusive[1].tolist() == [1, 1, 1, 0, 0] and inclusive[2].tolist() == [0, 0, 0, 0, 1]
    strict = charades.frame_targets(VIDEO, times, 4, strict=True)
    assert strict[1].tolist() == [0, 1, 0, 0, 0] and not strict[2].any()


def test_localization_points_and_targets():
    for length in (25.0, 30.33, 10.0):
        assert localization_points(length).tolist() == [(j - 1) / 25 * length for j in range(1, 26)]
    # in the official order (j-1)/25*length, point 8 of a 25 s video lies at 7.000000000000001, not 7
    assert localization_points(25.0)[7] > 7.0
    video = CharadesVideo("a", 25.0, [(0, 3.0, 5.0), (1, 10.0, 10.0), (2, 0.0, 7.0), (3, 7.0, 7.0)])
    target = charades.localization_targets([video], 4)
    assert target.shape == (1, 25, 4) and target.dtype == np.float32
    assert np.flatnonzero(target[0, :, 0]).tolist() == [3, 4, 5]
    assert np.flatnonzero(target[0, :, 1]).tolist() == [10]
    assert np.flatnonzero(target[0, :, 2]).tolist() == list(range(7)) and not target[0, :, 3].any()
    assert charades.dense_frame_times(4, 2.0).tolist() == [0.0, 0.5, 1.0, 1.5]


# ---------------------------------------------------------------------------------------------- metrics

def assert_same(a, b):
    """Two MeanAP results are identical (NaN per-class entries included)."""
    assert type(a) is type(b) and a.map == b.map
    np.testing.assert_array_equal(a.per_class_ap, b.per_class_ap)


# file order v0..v3; class 0 has a tie at 0.5 between v0 (positive) and v1 (negative)
LABELS = [{0}, {1}, {0, 1}, {1}]
SCORES = np.array([[0.5, 0.1], [0.5, 0.8], [0.2, 0.8], [0.9, 0.3]])


def test_classify_ties_follow_file_order():
    result = classify_map(SCORES, LABELS)
    # class 0 ranking v3-, v0+, v1-, v2+: (1/2 + 2/4) / 2; class 1 positives at ranks 1, 2, 3
    assert result.per_class_ap.tolist() == [0.5, 1.0] and result.map == 0.75
    swapped = classify_map(SCORES[[1, 0, 2, 3]], [LABELS[i] for i in [1, 0, 2, 3]])
    assert swapped.per_class_ap[0] == pytest.approx((1 / 3 + 2 / 4) / 2)
    # scikit-learn groups the tie instead, so it gives the swapped value for both orders
    assert average_precision_score([1, 0, 1, 0], SCORES[:, 0]) == pytest.approx(5 / 12)
    assert isinstance(result, charades.ClassifyMAP) and str(result).startswith("Charades_v1_classify mAP (official)")
    assert_same(classify_map(SCORES, charades.video_labels(LABELS, 2)), result)


def reference_ap(scores, labels):
    """AP of one class straight from the definition: rank by (-score, row), mean precision at the positives."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    hits, precisions = 0, []
    for rank, i in enumerate(order, 1):
        if labels[i]:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


def test_many_ties_match_the_definition():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 3, (500, 3)) / 2.0  # three distinct values: most rows tie
    labels = (rng.random((500, 3)) < 0.3).astype(np.float32)
    labels[:, 0] = np.maximum(labels[:, 0], labels.sum(1) == 0)  # no empty rows: plain ranking over all
    result = classify_map(scores, labels)
    expect = [reference_ap(scores[:, c].tolist(), labels[:, c].tolist()) for c in range(3)]
    assert result.per_class_ap.tolist() == pytest.approx(expect, rel=1e-12)
    assert result.map != pytest.approx(np.mean([average_precision_score(labels[:, c], scores[:, c])
                                                 for c in range(3)]), rel=1e-3)


def test_classify_class_without_positives_left_out():
    scores = np.column_stack([SCORES, [0.3, 0.2, 0.1, 0.0]])
    result = classify_map(scores, LABELS)
    assert np.isnan(result.per_class_ap[2]) and result.map == 0.75
    with pytest.raises(ValueError, match="no class has a positive"):
        classify_map(scores[:, 2:], [set()] * 4)


def test_classify_videos_without_actions_scored_minus_inf():
    scores = np.vstack([SCORES[:2], [[1.0, 1.0]], SCORES[2:]])
    labels = LABELS[:2] + [set()] + LABELS[2:]
    result = classify_map(scores, labels)
    # the empty video would rank first for both classes if it kept its score; it is never a false positive
    assert result.per_class_ap.tolist() == [0.5, 1.0]
    videos = [CharadesVideo(f"v{i}", 10.0, [(c, 0.0, 1.0) for c in sorted(s)]) for i, s in enumerate(labels)]
    assert_same(classify_map(scores, videos), result)


def test_classify_rejects_bad_input():
    with pytest.raises(ValueError, match=r"NaN score at index \(1, 0\)"):
        classify_map(np.where(np.eye(4, 2, -1) > 0, np.nan, SCORES), LABELS)
    with pytest.raises(ValueError, match="labels must be 0/1"):
        classify_map(SCORES, np.full((4, 2), 2.0))
    with pytest.raises(ValueError, match=r"class index 5 out of range for 2"):
        classify_map(SCORES, [{5}] * 4)


def test_localize_hand_computed():
    a = CharadesVideo("a", 25.0, [(0, 3.0, 5.0), (1, 10.0, 10.0)])
    empty = CharadesVideo("b", 10.0, [])
    scores = np.zeros((2, 25, 3))
    scores[0, [3, 4], 0], scores[0, 5, 0], scores[0, 0, 0] = 1.0, 0.5, 0.7
    scores[1, 0, 0] = 0.8
    result = localize_map(scores, [a, empty])
    # class 0: a3+, a4+, b0- (points of a video without actions stay negatives), a0-, a5+
    # class 1: all scores tie at 0, so a10 keeps its place (rank 11); class 2 has no positives
    assert result.per_class_ap[:2].tolist() == pytest.approx([(1 + 1 + 3 / 5) / 3, 1 / 11])
    assert np.isnan(result.per_class_ap[2])
    assert result.map == pytest.approx(((1 + 1 + 3 / 5) / 3 + 1 / 11) / 2)
    assert "official, 25 points" in str(result)
    assert_same(localize_map(scores, charades.localization_targets([a, empty], 3)), result)


def test_agreement_with_sklearn_without_ties():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 6)) < 0.3).astype(np.float32)
    labels[:, 5] = 0
    scores = rng.random((60, 6))
    kept = labels.sum(1) > 0
    assert not kept.all()
    expect = [average_precision_score(labels[kept, c], scores[kept, c]) for c in range(5)]
    result = classify_map(scores, labels)
    np.testing.assert_allclose(result.per_class_ap[:5], expect, rtol=1e-12)
    assert np.isnan(result.per_class_ap[5]) and result.map == pytest.approx(np.mean(expect), rel=1e-12)

    loc_scores, loc_labels = rng.random((8, 25, 4)), (rng.random((8, 25, 4)) < 0.2).astype(np.float32)
    flat_s, flat_l = loc_scores.reshape(-1, 4), loc_labels.reshape(-1, 4)
    expect = np.mean([average_precision_score(flat_l[:, c], flat_s[:, c]) for c in range(4)])
    assert localize_map(loc_scores, loc_labels).map == pytest.approx(expect, rel=1e-12)
    per_video = [(s.T, t.T) for s, t in zip(loc_scores, loc_labels)]
    dense = frame_map([s for s, _ in per_video], [t for _, t in per_video])
    assert dense.map == pytest.approx(expect, rel=1e-12) and "not official" in str(dense)


def test_frame_map_empty_classes():
    scores, targets = np.array([[0.9, 0.1, 0.4], [0.3, 0.2, 0.1]]), np.array([[1, 0, 1], [0, 0, 0]])
    assert frame_map(scores, targets).map == 1.0
    assert frame_map(scores, targets, count_empty_classes_as_zero=True).map == 0.5
    with pytest.raises(ValueError, match="labels have shape"):
        frame_map(scores, targets[:1])


# ---------------------------------------------------------------------------------------------- submissions

def annotated(tmp_path, n_videos=30, n_classes=7, seed=1):
    """A random annotation CSV (some videos without actions, class 6 never used) and its videos."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_videos):
        length = round(float(rng.uniform(5, 40)), 2)
        acts = []
        for _ in range(rng.integers(0, 4)):
            s = round(float(rng.uniform(0, length)), 2)
            acts.append(f"c{int(rng.integers(0, n_classes - 1)):03d} {s:.2f} {s + rng.uniform(0, 10):.2f}")
        rows.append((f"V{i:03d}X", ";".join(acts), length))
    path = write_csv(tmp_path / "Charades_v1_test.csv", rows)
    return path, read_charades_csv(path)


def test_classify_submission_round_trip(tmp_path):
    csv_path, videos = annotated(tmp_path)
    scores = np.random.default_rng(2).random((len(videos), 7)).astype(np.float32)
    scores[3, :] = scores[4, :]  # float32 ties must survive the text round trip
    expect = classify_map(scores, videos).map
    sub = tmp_path / "cls.txt"
    charades.write_classify_submission(sub, [v.id for v in videos], scores)
    first = sub.read_text().splitlines()[0].split()
    assert first[0] == videos[0].id and len(first) == 8
    assert score_submission("classify", csv_path, sub) == expect
    classes = write_classes(tmp_path / "Charades_v1_classes.txt", 7)
    out = run_cli("classify", "--annotations", csv_path, "--submission", sub, "--classes", classes, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"mAP: {expect:.6f}\n"


def test_localize_submission_round_trip_and_missing_frame(tmp_path):
    csv_path, videos = annotated(tmp_path, n_videos=12, seed=3)
    # all scores within 1e-7 of each other: only an exact text form keeps their ranking
    scores = 0.25 + 1e-7 * np.random.default_rng(4).random((len(videos), 25, 7))
    expect = localize_map(scores, videos).map
    sub = tmp_path / "loc.txt"
    charades.write_localize_submission(sub, [v.id for v in videos], scores)
    lines = sub.read_text().splitlines()
    assert len(lines) == 12 * 25 and lines[24].split()[:2] == [videos[0].id, "25"]
    assert score_submission("localize", csv_path, sub) == expect
    out = run_cli("localize", "--annotations", csv_path, "--submission", sub, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == f"mAP: {expect:.6f}\n", out.stderr

    sub.write_text("\n".join(lines[:30] + lines[31:]) + "\n")  # drop video 1, frame 6
    scores[1, 5] = -np.inf
    with pytest.warns(UserWarning, match=r"1 \(video, frame\) entries missing from the submission, scored -inf"):
        assert score_submission("localize", csv_path, sub) == localize_map(scores, videos).map


def test_missing_video_and_empty_video_hand_computed(tmp_path):
    # file order v0, v1, v4 (no actions), v2, v3; v2 is missing from the submission
    csv_path = write_csv(tmp_path / "t.csv", [("v0", "c000 0 1", 5), ("v1", "c001 0 1", 5), ("v4", "", 5),
                                              ("v2", "c000 0 1;c001 2 3", 5), ("v3", "c001 0 1", 5)])
    sub = tmp_path / "s.txt"
    sub.write_text("v0 0.5 0.1\nv1 0.5 0.8\nv4 1.0 1.0\nv3 0.9 0.3\nextra 1 1\n")
    with pytest.warns(UserWarning) as caught:
        value = score_submission("classify", csv_path, sub)
    # class 0: v3-, v0+ (1/2), v1-, then the -inf tie in file order: v4-, v2+ (2/5)
    # class 1: v1+ (1), v3+ (1), v0-, v4-, v2+ (3/5)
    assert value == pytest.approx(((1 / 2 + 2 / 5) / 2 + (1 + 1 + 3 / 5) / 3) / 2)
    messages = " | ".join(str(w.message) for w in caught)
    assert "1 videos missing from the submission, scored -inf (first: 'v2')" in messages
    assert "1 submission lines name videos not in the annotations, ignored" in messages
    out = run_cli("classify", "--annotations", csv_path, "--submission", sub, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == "mAP: 0.658333\n"  # 79/120
    assert "warning: " in out.stderr and "scored -inf (first: 'v2')" in out.stderr


@pytest.mark.parametrize("kind,text,expect", [
    ("classify", "v0 0.1 0.2\nv1 0.3 abc\n", "line 2: score 2 is not a number: 'abc'"),
    ("classify", "v0 0.1 0.2\n\nv1 0.3\n", "line 3: expected 2 scores (as line 1), found 1"),
    ("classify", "v0 0.1 nan\n", "line 1: score 2 is not a number: 'nan'"),
    ("classify", "v0 0.1 0.2\nv0 0.1 0.2\n", "line 2: duplicate entry 'v0', first on line 1"),
    ("classify", "v0\n", "line 1: expected 'id score_1 .. score_C', found 'v0'"),
    ("classify", "\n", "empty submission"),
    ("localize", "v0 0 0.1 0.2\n", "line 1: framenumber must be an integer 1..25 (1-based), found '0'"),
    ("localize", "v0 26 0.1 0.2\n", "framenumber must be an integer 1..25 (1-based), found '26'"),
    ("localize", "v0 1.5 0.1 0.2\n", "framenumber must be an integer 1..25 (1-based), found '1.5'"),
    ("localize", "v0 1 0.1 0.2\nv0 1 0.1 0.2\n", "line 2: duplicate entry ('v0', 1), first on line 1"),
])
def test_malformed_submission(tmp_path, kind, text, expect):
    csv_path = write_csv(tmp_path / "t.csv", [("v0", "c000 0 1", 5), ("v1", "c001 0 1", 5)])
    sub = tmp_path / "sub.txt"
    sub.write_text(text)
    with pytest.raises(CharadesFormatError) as e:
        score_submission(kind, csv_path, sub)
    assert str(sub) in str(e.value) and expect in str(e.value)


def test_submission_class_count_checks(tmp_path):
    csv_path = write_csv(tmp_path / "t.csv", [("v0", "c000 0 1", 5), ("v1", "c005 0 1", 5)])
    sub = tmp_path / "sub.txt"
    sub.write_text("v0 0.1 0.2\nv1 0.3 0.4\n")
    with pytest.raises(CharadesFormatError, match=r"t\.csv, line 3 \(video v1\): class index 5 out of range for 2"):
        score_submission("classify", csv_path, sub)
    classes = write_classes(tmp_path / "c.txt", 6)
    with pytest.raises(CharadesFormatError, match=r"line 1: expected 6 scores \(as the class list\), found 2"):
        score_submission("classify", csv_path, sub, classes)
    out = run_cli("classify", "--annotations", csv_path, "--submission", sub, "--classes", classes, cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert "error:" in out.stderr and "sub.txt, line 1: expected 6 scores" in out.stderr


def test_writers_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="duplicate video id 'a'"):
        charades.write_classify_submission(tmp_path / "s", ["a", "a"], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="bad or duplicate video id 'a b'"):
        charades.write_classify_submission(tmp_path / "s", ["a b"], np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"scores must be \(videos, 25, classes\)"):
        charades.write_localize_submission(tmp_path / "s", ["a"], np.zeros((1, 24, 3)))
    assert not os.listdir(tmp_path)
