"""Temporal quality metrics (daemon/offline/quality.py) and the eval report (report.py), on
synthetic clips whose motion and flicker are known."""

from __future__ import annotations

import base64
import re

import cv2
import numpy as np
import pytest

from daemon.offline.quality import (
    ClipEmbedder,
    after_update_flags,
    clip_consistency,
    edge_f1,
    edge_map,
    fit_to,
    flicker_score,
    frame_mad,
    measure,
    source_edges,
    source_motion,
    split_mad,
    structure_scores,
    warp_errors,
)
from daemon.offline.report import Report, VariantReport, sample_indices, text_table, write_report

SIZE = 96
SHIFT = (2, 1)  #: the window moves 2 px right and 1 px down per frame: content moves left/up


def translated_texture(frames: int = 10) -> list[np.ndarray]:
    """A smooth random texture seen through a window that slides by SHIFT every frame."""
    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur(rng.integers(0, 256, (160, 160, 3)).astype(np.float32), (0, 0), 2.0)
    big = ((big - big.min()) / np.ptp(big) * 255).astype(np.uint8)
    dx, dy = SHIFT
    return [
        np.ascontiguousarray(
            big[10 + dy * t : 10 + dy * t + SIZE, 10 + dx * t : 10 + dx * t + SIZE]
        )
        for t in range(frames)
    ]


def flickering(frames: list[np.ndarray], amplitude: int = 8) -> list[np.ndarray]:
    """Every other frame brighter, the others darker: flicker on top of the true motion."""
    return [
        np.clip(f.astype(np.int16) + (amplitude if t % 2 else -amplitude), 0, 255).astype(np.uint8)
        for t, f in enumerate(frames)
    ]


def test_frame_mad_by_hand():
    a = np.zeros((2, 2, 3), np.uint8)
    b = np.full((2, 2, 3), 10, np.uint8)
    c = b.copy()
    c[0, 0] = 40  # one pixel of four, all three channels, 30 levels: 90 / 12 = 7.5
    mad = frame_mad([a, b, c])
    assert mad.tolist() == [10.0, 7.5]
    # uint8 wrap-around would make 10 - 40 huge: the difference is taken in signed integers
    assert frame_mad([c, b]).tolist() == [7.5]
    assert flicker_score(0.0) == 1.0
    assert flicker_score(25.5) == pytest.approx(0.9)


def test_after_update_flags_follow_the_bank_schedule():
    # The bank updates at the end of calls 4 and 8: outputs 5 and 9 are the first to see it.
    assert np.flatnonzero(after_update_flags(11, 4)).tolist() == [5, 9]
    # With one frame of stream-batch latency, output j leaves call j + 1.
    assert np.flatnonzero(after_update_flags(11, 4, latency_frames=1)).tolist() == [4, 8]
    assert not after_update_flags(11, None).any()
    mad = np.array([1.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 3.0, 1.0])  # into frames 1..10
    after, other = split_mad(mad, after_update_flags(11, 4))
    assert after == pytest.approx(4.0)  # (5 + 3) / 2
    assert other == pytest.approx(1.0)
    assert split_mad(mad, after_update_flags(11, None)) == (None, None)


def test_warp_error_of_a_translated_texture_is_small_and_flicker_raises_it():
    source = translated_texture()
    motion = source_motion(source)
    own = warp_errors(source, motion)
    # The plain MAD sees the motion as change; the warp error sees that nothing but motion
    # happened.
    assert frame_mad(source).mean() > 10
    assert own.max() < 0.5, own
    flicker = warp_errors(flickering(source), motion)
    assert flicker.min() > 12, flicker  # 2 x 8 levels between consecutive frames
    assert flicker.mean() > 30 * own.mean()


def test_occlusion_mask_drops_pixels_that_leave_the_frame():
    motion = source_motion(translated_texture(4))
    dx, dy = SHIFT
    for valid in motion.valid:
        # Content moves left by dx and up by dy: the leftmost dx columns and top dy rows of frame
        # t are gone in frame t + 1, so nothing there can be compared.
        assert not valid[:, :dx].any()
        assert not valid[:dy, :].any()
        assert valid[dy + 2 : -2, dx + 2 : -2].mean() > 0.95


def texture(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    soft = cv2.GaussianBlur(rng.integers(0, 256, shape).astype(np.float32), (0, 0), 1.5)
    return ((soft - soft.min()) / np.ptp(soft) * 255).astype(np.uint8)


def test_occlusion_mask_drops_background_that_a_moving_object_covers():
    """A textured square slides 6 px right over a still background: the background just right
    of it in frame t is covered in frame t + 1, so its flow fails the forward-backward test."""
    background, square = texture(0, (SIZE, SIZE, 3)), texture(1, (32, 32, 3))

    def frame(x: int) -> np.ndarray:
        f = background.copy()
        f[32:64, x : x + 32] = square
        return f

    valid = source_motion([frame(20), frame(26)]).valid[0]
    assert valid[36:60, 52:58].mean() < 0.4  # covered next frame
    assert valid[70:90, 5:90].mean() > 0.95  # still background
    assert valid[36:60, 24:48].mean() > 0.9  # the square itself, moved


def test_measure_and_fit_to():
    source = translated_texture(9)
    wide = [cv2.resize(f, (SIZE * 2, SIZE), interpolation=cv2.INTER_LINEAR) for f in source]
    fitted = fit_to(wide[0], 48, 48)
    assert fitted.shape == (48, 48, 3)
    motion = source_motion(wide, size=(SIZE, SIZE))  # center crop then resize, as the engine
    assert motion.size == (SIZE, SIZE)
    q = measure(flickering(source), source_motion(source), interval=4, skip=2)
    assert q.mad == pytest.approx(frame_mad(flickering(source))[2:].mean())
    assert q.warp_error is not None and q.warp_error > 12
    assert q.mad_after_update is not None and q.mad_other is not None
    with pytest.raises(ValueError, match="one frame per source frame"):
        measure(source[:5], source_motion(source))
    with pytest.raises(ValueError, match="uint8"):
        frame_mad([source[0].astype(np.float32), source[1]])


def shapes(seed: int, size: int = SIZE) -> np.ndarray:
    """A few filled shapes of random dark/bright colours on a grey background."""
    rng = np.random.default_rng(seed)
    frame = np.full((size, size, 3), 128, np.uint8)
    for _ in range(3):
        colour = tuple(int(c) for c in rng.choice([20, 235], 3))
        x, y = (int(v) for v in rng.integers(15, size - 15, 2))
        if rng.random() < 0.5:
            cv2.circle(frame, (x, y), int(rng.integers(8, 16)), colour, -1)
        else:
            cv2.rectangle(frame, (x - 10, y - 8), (x + 10, y + 8), colour, -1)
    return frame


def test_edge_f1_identical_shifted_and_unrelated():
    frame = shapes(0)
    edges = edge_map(frame)
    assert 100 < edges.sum() < 0.2 * edges.size  # outlines, not noise
    assert edge_f1(edges, edges) == 1.0
    # Within the tolerance (2 px) a 1 px shift keeps nearly every edge; 8 px does not.
    assert edge_f1(edge_map(np.roll(frame, 1, axis=1)), edges) > 0.9
    assert edge_f1(edge_map(np.roll(frame, (1, 1), axis=(0, 1))), edges) > 0.9
    assert edge_f1(edge_map(np.roll(frame, 8, axis=1)), edges) < 0.5
    assert edge_f1(edge_map(shapes(1)), edges) < 0.25  # other shapes elsewhere
    # The same shapes in other colours: what a restyle that keeps the structure gives.
    recoloured = 255 - frame
    assert edge_f1(edge_map(recoloured), edges) > 0.9
    # Nothing where something was is 0; nothing where nothing was is 1.
    flat = np.full_like(frame, 90)
    assert edge_f1(edge_map(flat), edges) == 0.0 and edge_f1(edges, edge_map(flat)) == 0.0
    assert edge_f1(edge_map(flat), edge_map(flat)) == 1.0
    with pytest.raises(ValueError, match="differ"):
        edge_f1(edges, edges[:10])


def test_camera_noise_makes_no_edges():
    """The blur and thresholds keep a camera's noise (sigma 6/255, the static witness clip's)
    out of the edge map, so a still noisy source does not look like changing structure."""
    rng = np.random.default_rng(3)
    frame = shapes(2)
    noisy = np.clip(frame + rng.normal(0, 6, frame.shape), 0, 255).astype(np.uint8)
    assert edge_map(np.full_like(noisy, 128) + (noisy - frame)).sum() == 0
    assert edge_f1(edge_map(noisy), edge_map(frame)) > 0.9


def test_structure_of_a_clip_frame_by_frame():
    source = [np.roll(shapes(0), 2 * t, axis=1) for t in range(6)]  # moving 2 px a frame
    reference = source_edges(source)
    assert structure_scores(source, reference).tolist() == [1.0] * 6
    # Still output of a moving source: it keeps frame 0's shapes, so it drifts off the source.
    still = structure_scores([source[0]] * 6, reference)
    assert still[0] == 1.0 and still[-1] < 0.5 and np.all(np.diff(still) <= 1e-9)
    unrelated = [shapes(10 + t) for t in range(6)]
    q = measure(unrelated, edges=reference, skip=2)
    assert q.structure is not None and q.edge_f1 == pytest.approx(q.structure[2:].mean())
    assert q.edge_f1 < 0.25
    assert measure(source).structure is None and measure(source).edge_f1 is None
    wide = [cv2.resize(f, (SIZE * 2, SIZE)) for f in source]
    assert source_edges(wide, size=(SIZE, SIZE)).size == (SIZE, SIZE)
    with pytest.raises(ValueError, match="one frame per source frame"):
        structure_scores(source[:4], reference)
    with pytest.raises(ValueError, match="output size"):
        structure_scores([cv2.resize(f, (48, 48)) for f in source], reference)


def test_clip_consistency_without_a_cached_model_says_why():
    result = clip_consistency(translated_texture(3), "no-such-org/no-such-clip-model")
    assert result.value is None
    assert "not measured" in result.note and "no-such-clip-model" in result.note


def test_clip_consistency_with_a_local_model(tmp_path):  # (loaded once, used for two clips)
    """A tiny random-weight CLIP vision model saved to a folder, loaded through from_pretrained."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path)
    frames = translated_texture(4)
    embedder = ClipEmbedder.load(str(tmp_path))
    assert isinstance(embedder, ClipEmbedder)
    still = embedder.consistency([frames[0]] * 4)
    assert still.value == pytest.approx(1.0, abs=1e-5)
    rng = np.random.default_rng(2)
    noise = [rng.integers(0, 256, frames[0].shape, dtype=np.uint8) for _ in range(4)]
    changing = embedder.consistency([frames[0], noise[0], frames[0], noise[1]])
    assert changing.value is not None and changing.value < still.value - 1e-3


def _report() -> Report:
    source = translated_texture(10)
    motion = source_motion(source)
    edges = source_edges(source)
    indices = sample_indices(len(source), start=1)
    variants = [
        VariantReport(
            name=name,
            quality=measure(clip, motion, edges=edges, interval=4, skip=1),
            strip=[clip[i] for i in indices],
            description=f"the {name} clip",
            fps=12.5,
            ff_pass_rate=0.25,
        )
        for name, clip in (("steady", source), ("flickering", flickering(source)))
    ]
    return Report(
        "eval of a test clip",
        frame_mad(source),
        indices,
        [source[i] for i in indices],
        variants,
        {"model": "none"},
        skip=1,
    )


def test_html_report_embeds_its_plots_and_frames(tmp_path):
    path = tmp_path / "report.html"
    assert write_report(_report(), path) == [path]
    text = path.read_text()
    assert "<td>steady</td>" in text and "<td>flickering</td>" in text
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 2 + 2 * 2  # summary plot and strip, then a plot and a strip each
    for data in images:
        picture = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 300
        assert picture.std() > 10  # drawn, not blank
    assert "http" not in text.replace("http-equiv", "")  # self-contained: nothing to fetch


def test_text_table_lines_up_the_figures():
    lines = text_table(_report()).splitlines()
    assert lines[0].split()[:2] == ["variant", "MAD"]
    assert lines[1].startswith("steady ") and lines[2].startswith("flickering ")
    assert len({len(line) for line in lines[1:]}) == 1  # right-aligned columns
    assert "15.99" in lines[2] or "16.00" in lines[2]  # the flickering clip's warp error
    assert "edge F1" in lines[0] and "1.000" in lines[1]  # the source's own edges


def test_markdown_report_writes_its_pictures(tmp_path):
    written = write_report(_report(), tmp_path / "eval.md")
    text = (tmp_path / "eval.md").read_text()
    assert "| steady |" in text
    pictures = [p for p in written if p.suffix == ".png"]
    assert len(pictures) == 6
    for p in pictures:
        assert p.name in text and cv2.imread(str(p)) is not None
    with pytest.raises(ValueError, match=r"\.html"):
        write_report(_report(), tmp_path / "eval.pdf")
