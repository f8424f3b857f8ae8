"""The one typed config tree and everything around it.

    schema.py          the dataclasses (`Config` and its sections), each field with its default and meaning
    loading.py         YAML + `--section.key=value` overrides -> a checked `Config` (`load_config`), and back to YAML
    checks.py          cross-field checks, at load
    preflight.py       the machine checks (device, model folders, dataset files and rows) before a run starts
    layout_scaling.py  role counts re-planned for the ranks a job got (layout.scale: proportional)
    openrlhf.py        an OpenRLHF command line -> a config, with `openrlhf_flags.py` as the table of flags
"""
