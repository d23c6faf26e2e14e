"""pytest's entry point for kolora-probe (``pytest11``): it loads the gate's plugin only where a project asks for it.

Installing kolora-probe adds no option to anybody's pytest run: a project's own ``--model`` or ``--r`` keep working.
The plugin (``kolora_probe_checks.plugin``, with ``--plan``, ``--model``, … and the reports) is loaded when

* a run names it: ``pytest -p kolora_probe_checks.plugin`` (what ``kolora-probe check`` does), or a
  ``conftest.py`` lists it in ``pytest_plugins``, or the project's pytest ini has ``-p kolora_probe_checks.plugin``
  in ``addopts`` (this repository's ``pytest.ini`` does); or
* the space form of a path option is used where the ini asks for it: ``pytest --model /abs/dir`` from such a
  project's root. pytest chooses its rootdir and ini from every path on the command line before it knows the
  plugin's options, so ``/abs/dir`` makes it miss the project's ini; this entry point finds the ini from the
  directory pytest was started in, and when it asks for the plugin, restores that rootdir and ini and loads the
  plugin before pytest parses the options (so ``/abs/dir`` is read as ``--model``'s value). A run that names its
  ini (``-c FILE`` / ``--config-file FILE``) keeps it: nothing is loaded or restored then.
"""
from __future__ import annotations

PLUGIN = "kolora_probe_checks.plugin"


def pytest_addoption(parser, pluginmanager) -> None:  # noqa: ARG001 - pytest's hook signature
    if pluginmanager.has_plugin(PLUGIN):
        return
    config = pluginmanager.get_plugin("pytestconfig")
    if config is None or _names_its_ini(config.invocation_params.args):
        return
    try:
        from _pytest.config.findpaths import locate_config

        found = locate_config(config.invocation_params.dir, [config.invocation_params.dir])
    except Exception:  # noqa: BLE001 - a pytest whose internals differ: the plugin is then loaded only by -p
        return
    rootdir, inipath, inicfg = found[0], found[1], found[2]
    if inipath is None or PLUGIN not in str(inicfg.get("addopts", "")):
        return
    if config.inipath != inipath:  # pytest took an option's value for a path: use the project's ini after all
        config._rootpath, config._inipath, config._inicfg = rootdir, inipath, inicfg
        config._inicache.clear()
    pluginmanager.import_plugin(PLUGIN)


def _names_its_ini(args) -> bool:
    """The run chose its ini itself (``-c FILE``, ``-cFILE``, ``--config-file[=]FILE``): that choice stands."""
    for a in map(str, args):
        if a == "--":
            break
        if a in ("-c", "--config-file") or a.startswith("--config-file=") or (a.startswith("-c") and a[2:3] != "-"):
            return True
    return False
