"""`ringlinear serve` details that need no live server."""
from ringlinear.server.cli import default_model_name


def test_a_trained_model_is_served_under_the_runs_name():
    assert default_model_name("runs/demo/final") == "demo"
    assert default_model_name("runs/demo/final/") == "demo"
    assert default_model_name("runs/demo/checkpoints/step-0000500") == "demo-step-0000500"
    assert default_model_name("/models/Ring-mini-linear-2.0") == "Ring-mini-linear-2.0"
    assert default_model_name("/data/step-12") == "step-12"  # only a run's checkpoints/ dir counts
