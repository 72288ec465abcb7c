"""Run a staged training pipeline from one YAML file: stages in order, each a training script with its settings,
later stages reading earlier stages' outputs by name.

    python -m common.pipeline pipelines/image.yaml [--only vae_gan] [--list]

    output_dir: out/image            # each stage writes to <output_dir>/<stage name> unless it sets output_dir
    launcher: python                 # or: accelerate (`accelerate launch` with its saved configuration)
    stages:
      - name: vae_warmup
        script: train_image_vae.py
        config: configs/image_vae.yaml   # optional: the recipe the stage starts from
        args:                            # any of the script's flags, as in a --config file
          train_data_dir: ./images
          adv_weight: 0
        stop_when: loss/rec<0.03         # optional: end the stage on a logged metric (with stop_when_logs: W)
      - name: vae_gan
        script: train_image_vae.py
        config: configs/image_vae.yaml
        args:
          pretrained_vae_model_name_or_path: ${stages.vae_warmup.output_dir}
          disc_start_step: 0

Each stage runs as `python SCRIPT --config <stage folder>/stage_config.yaml`, a file holding the stage's recipe
with its `args` on top (so the script checks every value with its own types), `resume_from_checkpoint: latest` and
its output_dir. A stage that finished (it exported its model: `config.json` in its folder) is marked
`pipeline_stage.json` and skipped on the next run; one that was interrupted resumes from its last checkpoint. A
finished stage whose settings have changed since is refused with the differences, not silently reused.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"\$\{([^}]+)\}")
STAGE_KEYS = {"name", "script", "config", "args", "stop_when", "stop_when_logs", "output_dir"}


class PipelineError(ValueError):
    pass


def load_pipeline(path):
    """The pipeline file as {"output_dir", "launcher", "stages": [...]}, each stage with its output_dir resolved and
    its `${...}` references substituted; refuses unknown keys, duplicate names and references to later stages."""
    try:
        with open(path) as f:
            spec = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        raise PipelineError(f"{path}: unreadable ({' '.join(str(err).split())})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise PipelineError(f"{path}: needs a list of stages under 'stages'")
    unknown = set(spec) - {"output_dir", "launcher", "stages"}
    if unknown:
        raise PipelineError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (valid: output_dir, launcher, "
                            f"stages)")
    root = spec.get("output_dir", "out/pipeline")
    launcher = spec.get("launcher", "python")
    if launcher not in ("python", "accelerate"):
        raise PipelineError(f"{path}: launcher '{launcher}' is not python or accelerate")
    done, stages = {}, []
    for n, stage in enumerate(spec["stages"]):
        where = f"{path}: stage {n + 1}"
        if not isinstance(stage, dict) or "name" not in stage or "script" not in stage:
            raise PipelineError(f"{where} needs a name and a script")
        where = f"{path}: stage '{stage['name']}'"
        bad = set(stage) - STAGE_KEYS
        if bad:
            raise PipelineError(f"{where}: unknown key(s) {', '.join(sorted(bad))} (valid: "
                                f"{', '.join(sorted(STAGE_KEYS))})")
        if stage["name"] in done:
            raise PipelineError(f"{where}: a stage of that name comes earlier")
        if not (ROOT / stage["script"]).is_file():
            raise PipelineError(f"{where}: no script {stage['script']} in {ROOT}")
        if stage.get("config") and not (Path(stage["config"]).exists() or (ROOT / stage["config"]).exists()):
            raise PipelineError(f"{where}: no config file {stage['config']}")
        stage = substitute(stage, {"output_dir": root, "stages": done}, where)
        stage.setdefault("output_dir", str(Path(root) / stage["name"]))
        stage["args"] = dict(stage.get("args") or {})
        stage["pipeline"] = Path(path).stem
        done[stage["name"]] = {"output_dir": stage["output_dir"]}
        stages.append(stage)
    return {"output_dir": root, "launcher": launcher, "stages": stages}


def substitute(value, context, where):
    """Replace `${output_dir}` and `${stages.NAME.output_dir}` in every string inside `value`."""
    if isinstance(value, dict):
        return {k: substitute(v, context, where) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, context, where) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match):
        node = context
        for part in match.group(1).strip().split("."):
            if not isinstance(node, dict) or part not in node:
                earlier = ", ".join(context["stages"]) or "none"
                raise PipelineError(f"{where}: ${{{match.group(1)}}} names nothing known here (earlier stages: "
                                    f"{earlier}; a stage gives output_dir)")
            node = node[part]
        return str(node)

    return REFERENCE.sub(lookup, value)


def stage_config(stage):
    """The settings a stage runs with: its recipe, its args on top, its stop condition, resume and output folder."""
    config = {}
    if stage.get("config"):
        path = Path(stage["config"])
        path = path if path.exists() else ROOT / path  # relative to where the pipeline runs, or to the scripts
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    config.update(stage["args"])
    for key in ("stop_when", "stop_when_logs"):
        if key in stage:
            config[key] = stage[key]
    config.setdefault("resume_from_checkpoint", "latest")
    config.setdefault("tracker_group", stage["pipeline"])  # a pipeline's stages side by side in wandb
    config.setdefault("tracker_run_name", stage["name"])
    config["output_dir"] = stage["output_dir"]
    return config


def run_stage(stage, launcher, log=print):
    """Run one stage unless it finished with the same settings. Returns 'skipped', 'done' or raises."""
    folder = Path(stage["output_dir"])
    marker, config = folder / "pipeline_stage.json", stage_config(stage)
    if marker.exists():
        before = json.loads(marker.read_text())["config"]
        changed = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
        if changed:
            raise PipelineError(f"stage '{stage['name']}' finished in {folder} with other settings "
                                f"({', '.join(f'{k}: {before.get(k)!r} -> {config.get(k)!r}' for k in changed[:4])}); "
                                f"remove that folder or give the stage another output_dir to train it again")
        log(f"[pipeline] {stage['name']}: finished earlier, skipped")
        return "skipped"
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "stage_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    script = str(ROOT / stage["script"])
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", script, "--config", str(config_path)]
    else:
        cmd = [sys.executable, script, "--config", str(config_path)]
    log(f"[pipeline] {stage['name']}: {' '.join(cmd)}")
    status = subprocess.call(cmd)  # from the current folder, so the stages' relative paths mean what they say
    if status != 0:
        raise PipelineError(f"stage '{stage['name']}' exited with status {status}; fix the cause and run the "
                            f"pipeline again: it resumes from the stage's last checkpoint")
    if not (folder / "config.json").exists():
        raise PipelineError(f"stage '{stage['name']}' stopped before finishing (no export in {folder}); run the "
                            f"pipeline again to resume it from its last checkpoint")
    marker.write_text(json.dumps({"stage": stage["name"], "script": stage["script"], "config": config}, indent=1))
    log(f"[pipeline] {stage['name']}: finished")
    return "done"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", help="The pipeline's YAML file.")
    parser.add_argument("--only", nargs="+", default=None, help="Run only these stages (their inputs must exist).")
    parser.add_argument("--list", action="store_true",
                        help="Print the stages and their resolved settings, run nothing.")
    args = parser.parse_args(argv)
    try:
        pipeline = load_pipeline(args.pipeline)
        names = [s["name"] for s in pipeline["stages"]]
        unknown = set(args.only or ()) - set(names)
        if unknown:
            raise PipelineError(f"--only {' '.join(sorted(unknown))}: no such stage (stages: {', '.join(names)})")
        for stage in pipeline["stages"]:
            if args.list:
                print(f"# {stage['name']}: {stage['script']}\n{yaml.safe_dump(stage_config(stage), sort_keys=False)}")
            elif args.only is None or stage["name"] in args.only:
                run_stage(stage, pipeline["launcher"])
    except PipelineError as err:
        sys.exit(f"pipeline: {err}")


if __name__ == "__main__":
    main()
