"""`livelens bench quality`: the parts that need no engine (the end-to-end run is the benchmark)."""

from pathlib import Path

from livelens.dev.bench.quality import model_repository, says_yes, summary


def test_says_yes() -> None:
    assert says_yes("Yes, a cat appeared at 12 s.")
    assert says_yes('"yes"')
    assert not says_yes("No, there was no cat.")
    assert not says_yes("I see a street. Yes.")


def test_model_repository_serves_both_projectors(tmp_path: Path) -> None:
    seeded = tmp_path / "seeded.onnx"
    seeded.write_bytes(b"not really onnx")
    trained = tmp_path / "trained.onnx"
    trained.write_bytes(b"trained")
    repo = model_repository(tmp_path / "repo", {"vision_encoder_trained": trained, "vision_encoder_seeded": seeded})
    assert sorted(p.name for p in repo.iterdir()) == ["vision_encoder_seeded", "vision_encoder_trained"]
    config = (repo / "vision_encoder_seeded" / "config.pbtxt").read_text()
    assert 'name: "vision_encoder_seeded"' in config and 'name: "vision_encoder"' not in config
    assert (repo / "vision_encoder_seeded" / "1" / "model.onnx").read_bytes() == b"not really onnx"
    assert (repo / "vision_encoder_trained" / "1" / "model.onnx").read_bytes() == b"trained"
    assert (repo / "vision_encoder_trained" / "1" / "model.py").is_file()


def test_summary_lists_every_needle_row() -> None:
    result = {"grounding": {"samples": 2, "trained_top1": 0.5, "trained_top3": 1.0, "seeded_top1": 0.0,
                            "seeded_top3": 0.0, "tags_top1": 0.5, "tags_top3": 0.5, "text_labels_top1": 1.0},
              "needle": [{"method": m, "haystack_minutes": 1, "depth": 0.5, "accuracy": 1.0, "false_alarm": 0.0,
                          "retrieved_needle": True} for m in ("window", "streaming_kv")],
              "agreement": [{"method": "streaming_kv", "haystack_minutes": 1, "depth": 0.5, "token_match": 0.75,
                             "top5_overlap": 0.8}]}
    text = summary(result)
    assert "trained top-1 0.50 top-3 1.00" in text
    assert "frame tags (the service) top-1 0.50 top-3 0.50" in text
    assert "| streaming_kv | 1 | 0.5 | 1.00 | 0.00 | True |" in text
    assert "token match 0.75, top-5 overlap 0.80" in text
