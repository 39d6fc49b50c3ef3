"""The installed distribution activates ttc-vllm the way vLLM loads plugins."""
from importlib.metadata import entry_points



def _entry(group: str, name: str):
    eps = {ep.name: ep for ep in entry_points(group=group)}
    assert name in eps, f"{group} has no entry point {name!r}: is ttc-vllm installed (pip install -e .)?"
    return eps[name].load()


def test_logits_processor_entry_point_passes_both_runner_loaders():
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2

    cls = _entry("vllm.logits_processors", "ttc_controls")
    # the V1 loader and the V2 loader (Model Runner V2, GPU default) each check their base
    assert issubclass(cls, V1) and issubclass(cls, V2)


def test_endpoint_plugin_entry_point_has_the_vllm_plugin_shape():
    plugin = _entry("vllm.endpoint_plugins", "ttc_sampling_controller")
    obj = plugin() if isinstance(plugin, type) else plugin
    assert obj.name and callable(obj.attach_router) and callable(obj.init_state)


def test_general_plugin_and_console_script():
    register = _entry("vllm.general_plugins", "ttc_vllm")
    assert register() is None
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("ttc-vllm") == "ttc_vllm.cli:main"


def test_testbed_weights_ship_as_package_data():
    from ttc_vllm.testbed import policy_path

    files = {p.name for p in policy_path().iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    size = sum(p.stat().st_size for p in policy_path().parent.rglob("*") if p.is_file())
    assert size < 30 * 2**20, f"shipped weights are {size / 2**20:.1f} MiB"
    # the PRM ships as a recipe (its body is rebuilt from the policy): config and head only
    from ttc_vllm.testbed import prm_recipe_path
    from ttc_vllm.testbed.prm_circuit import HEAD_FILE

    prm_files = {p.name for p in prm_recipe_path().iterdir()}
    assert {"config.json", HEAD_FILE, "tokenizer.json"} <= prm_files and "model.safetensors" not in prm_files
