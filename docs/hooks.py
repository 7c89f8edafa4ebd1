"""MkDocs hooks: fill the generated pages from the code (https://www.mkdocs.org/user-guide/configuration/#hooks).

`<!-- cli-reference -->` becomes typer's own Markdown for the `alexnet-mlflow` app, and
`<!-- train-parameters -->` / `<!-- mlproject-entry-points -->` become tables read from
TrainConfig and MLproject: the docs cannot drift from the code.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_reference() -> str:
    import typer
    from typer.cli import get_docs_for_click

    from alexnet_mlflow.cli import app

    command = typer.main.get_command(app)
    with typer.Context(command) as ctx:
        return get_docs_for_click(obj=command, ctx=ctx, name="alexnet-mlflow", title="CLI reference")


def train_parameters() -> str:
    from alexnet_mlflow.config import fields, format_param

    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    for f in fields():
        choices = f" One of: {', '.join(f.metadata['choices'])}." if f.metadata["choices"] else ""
        rows.append(f"| `{f.name}` | `{format_param(f.default)}` | {f.metadata['help']}{choices} |")
    return "\n".join(rows)


def mlproject_entry_points() -> str:
    import yaml

    project = yaml.safe_load((ROOT / "MLproject").read_text())
    out = []
    for name, entry in project["entry_points"].items():
        out.append(f"### `{name}`\n\n`mlflow run . -e {name} --env-manager local -P NAME=VALUE ...`\n")
        out.append("| parameter | type | default |\n|---|---|---|")
        out += [f"| `{p}` | {spec['type']} | `{spec['default']}` |" for p, spec in entry["parameters"].items()]
        out.append("")
    return "\n".join(out)


GENERATED = {
    "<!-- cli-reference -->": cli_reference,
    "<!-- train-parameters -->": train_parameters,
    "<!-- mlproject-entry-points -->": mlproject_entry_points,
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, generate in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown
