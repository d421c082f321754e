"""The admin command line, `gateway …`: a click group whose commands run in the app's context."""
import functools
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from sqlalchemy.exc import SQLAlchemyError
from flask.cli import ScriptInfo, with_appcontext

from . import create_app, results
from .annotations.dictionary import DEFAULT_SOURCES, load_sample, load_semehr_csv, load_umls
from .annotations.importer import import_folder
from .annotations.mappings import load_mappings
from .annotations.transactions import recent as recent_transactions
from .archive import storage, sweep_storage
from .auth.users import create_user, grant, set_password
from .db import db, init_db
from .demo import seed_demo
from .errors import GatewayError
from .forms import create_form
from .migrations import SCHEMA_DIALECTS, SchemaError, schema_sql, schema_state, upgrade
from .models import PROJECT_KINDS, SERIES_STATUSES
from .projects import add_member, archive_by_name, create_archive, create_project
from .server import SETTINGS, serve


def _fail_on_value_error(function):
    """Every command exits non-zero with a one-line reason on bad input."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (ValueError, GatewayError, SchemaError) as error:
            raise click.ClickException(str(error)) from None

    return wrapper


def _needs_current_schema(function):
    """Refuses a store whose schema is not this version's (none yet, older, or newer), saying what to run."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        problem = schema_state().problem()
        if problem:
            raise click.ClickException(problem)
        return function(*args, **kwargs)

    return wrapper


def admin_command(group, name=None, **options):
    """A command of `group` that runs in the app context, needs the current schema and reports ValueErrors."""

    def decorate(function):
        return group.command(name, **options)(with_appcontext(_needs_current_schema(_fail_on_value_error(function))))

    return decorate


def _read_secret_line():
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise click.ClickException("no password on standard input (it is read as one line, e.g. piped)")
    return line


user_group = click.Group("user", help="Archive API users and their permissions.")
project_group = click.Group("project", help="Projects and their members.")
archive_group = click.Group("archive", help="Archives of a project.")
results_group = click.Group("results", help="Algorithm results of a series.")
series_group = click.Group("series", help="Series status, for algorithm runners.")
form_group = click.Group("form", help="Reporting forms of a project.")
concepts_group = click.Group("concepts", help="The concept dictionary that expands annotation queries.")
transactions_group = click.Group("transactions", help="The record of annotation API searches.")
mappings_group = click.Group("mappings", help="Named mappings of terms to CUIs, for the annotation API.")
annotations_group = click.Group("annotations", help="The annotation store: NLP results of report documents.")
storage_group = click.Group("storage", help="The folder of DICOM and result files.")
db_group = click.Group("db", help="The database schema: its revision, upgrades, and its DDL.")
SERIES_ARGUMENTS = ("project", "archive", "patient_id", "study_uid", "series_uid")


def series_arguments(function):
    for name in reversed(SERIES_ARGUMENTS):
        function = click.argument(name)(function)
    return function


def _upgrade(at_head_already):
    """Upgrade the store to head and say what that did, or `at_head_already`."""
    try:
        report = upgrade()
    except SQLAlchemyError as error:
        reason = str(error).splitlines()[0]
        raise click.ClickException(f"the upgrade failed and changed nothing: {reason}") from None
    if not report.applied:
        click.echo(at_head_already)
        return
    if report.created_tables:
        click.echo(f"created tables: {', '.join(report.created_tables)}")
    applied = ", ".join(f"{revision} ({message})" for revision, message in report.applied)
    click.echo(f"upgraded {report.before.describe()} to {report.applied[-1][0]}: applied {applied}")


@click.command("init-db")
@with_appcontext
@_fail_on_value_error
def init_db_command():
    """Create the schema in a new database (as 'db upgrade' does).

    The same as 'gateway db upgrade': on a database that has a schema already, it upgrades that.
    """
    _upgrade("database already initialised")


@db_group.command("upgrade")
@with_appcontext
@_fail_on_value_error
def db_upgrade():
    """Upgrade the schema to this version's (head).

    From an empty database it creates the schema; a database made before the gateway had migrations is
    adopted (the tables it lacks are created). All of it in one transaction: a failed upgrade changes nothing.
    """
    _upgrade(f"the database is at head already ({schema_state().head})")


@db_group.command("current")
@with_appcontext
def db_current():
    """Show the schema's revision; exits 1 unless it is head.

    Not at head (no schema, older, or newer than this version), it says so and what to run.
    """
    state = schema_state()
    if not state.at_head:
        raise click.ClickException(state.problem())
    click.echo(f"{state.revision} (head)")


@db_group.command("schema")
@click.option("--dialect", type=click.Choice(sorted(SCHEMA_DIALECTS)), default="postgresql", show_default=True)
def db_schema(dialect):
    """Print the DDL that the models make (schema.sql).

    Generated from gateway/models.py; schema.sql in the repository is its PostgreSQL output.
    """
    click.echo(schema_sql(dialect), nl=False)


@admin_command(user_group, "create")
@click.argument("username")
@click.option("--email", required=True)
def user_create(username, email):
    """Create a user; the password is read as one line from standard input."""
    create_user(username, email, _read_secret_line())
    click.echo(f"user {username} created")


@admin_command(user_group, "set-password")
@click.argument("username")
def user_set_password(username):
    """Change a user's password (one line from standard input)."""
    set_password(username, _read_secret_line())
    click.echo(f"password of {username} changed")


@admin_command(user_group, "grant")
@click.argument("username")
@click.argument("permissions", nargs=-1, required=True)
def user_grant(username, permissions):
    """Grant api_* permissions (or 'all')."""
    granted = grant(username, permissions)
    click.echo(f"{username} now holds {', '.join(granted)}")


@admin_command(project_group, "create")
@click.argument("name")
@click.option("--kind", type=click.Choice(PROJECT_KINDS), default=PROJECT_KINDS[0], show_default=True)
def project_create(name, kind):
    """Create a project."""
    create_project(name, kind)
    click.echo(f"project {name} ({kind}) created")


@admin_command(project_group, "add-member")
@click.argument("project")
@click.argument("username")
@click.option("--upload", is_flag=True, help="Also allow uploads to the project (upload_project).")
def project_add_member(project, username, upload):
    """Make a user a member of a project."""
    add_member(project, username, can_upload=upload)
    click.echo(f"{username} is a member of {project}{' with upload' if upload else ''}")


@admin_command(archive_group, "create")
@click.argument("project")
@click.argument("name")
def archive_create(project, name):
    """Create an archive in a project."""
    create_archive(project, name)
    click.echo(f"archive {name} created in {project}")


@admin_command(results_group, "add")
@series_arguments
@click.option("--type", "result_type", required=True, type=click.Choice(PROJECT_KINDS))
@click.option("--name", required=True)
@click.option("--algorithm", required=True)
@click.option("--value", help="A scalar: an integer literal is stored as an int, a decimal as a float, else a string.")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False), help="A result file (PNG, PDF, …).")
def results_add(project, archive, patient_id, study_uid, series_uid, result_type, name, algorithm, value, path):
    """Store (or replace) a result of a series."""
    if (value is None) == (path is None):
        raise click.ClickException("give either --value or --file")
    target = archive_by_name(project, archive)
    series_keys = (patient_id, study_uid, series_uid)
    if path is None:
        answer = results.add_result(target, *series_keys, result_type, name, algorithm, value=value)
    else:
        with open(path, "rb") as source, storage().spooled(source) as (handle, size):
            upload = (handle, os.path.basename(path), size)
            answer = results.add_result(target, *series_keys, result_type, name, algorithm, upload=upload)
    click.echo(json.dumps(answer))


@admin_command(series_group, "status")
@series_arguments
@click.argument("status", type=click.Choice(SERIES_STATUSES))
@click.option("--message", help="The status message (e.g. why processing failed).")
def series_status(project, archive, patient_id, study_uid, series_uid, status, message):
    """Set a series' status and status message."""
    results.set_series_status(archive_by_name(project, archive), patient_id, study_uid, series_uid, status, message)
    click.echo(f"series {series_uid} is {status}")


@admin_command(form_group, "create")
@click.argument("project")
@click.argument("name")
@click.option("--schema", "schema_path", required=True, type=click.Path(exists=True, dir_okay=False))
def form_create(project, name, schema_path):
    """Create a reporting form from a JSON definition {"fields": [{name, label, type, required, choices}]}."""
    with open(schema_path, encoding="utf-8") as source:
        definition = create_form(project, name, source.read())
    click.echo(f"form {name} created in {project} with {len(definition['fields'])} fields")


@admin_command(mappings_group, "load")
@click.argument("directory", type=click.Path(file_okay=False))
def mappings_load(directory):
    """Store every *.json of DIRECTORY as a mapping named by its file stem, replacing one of that name.

    A file is {term: [CUI or "CUI<tab>PREF<tab>STY", ...]}. Every file is read first: one bad file stores none.
    """
    for name, term_count in load_mappings(directory).items():
        click.echo(f"{name}: {term_count} terms")


FOLDER = click.Path(exists=True, file_okay=False)


@admin_command(annotations_group, "import")
@click.option("--json-dir", required=True, type=FOLDER, help="NLP result files, *.json.")
@click.option("--text-dir", type=FOLDER, help="Report texts: the same stem as the NLP file, .txt.")
@click.option("--meta-dir", type=FOLDER, help="DICOM metadata: the same stem as the NLP file, .json.")
@click.option("--batch-size", default=5000, show_default=True, type=click.IntRange(1, 100_000),
              help="Documents stored per transaction.")
def annotations_import(json_dir, text_dir, meta_dir, batch_size):
    """Import the NLP result files of a folder; a document imported again replaces the earlier one.

    The SOPInstanceUID comes from the metadata (the meta file, else the NLP file's top level), else from
    the file stem. A bad file is reported with its reason and skipped; the rest are imported. Exits 0 when
    at least one document was stored; non-zero with a one-line reason when a folder is missing, when
    --json-dir holds no *.json, or when every file was skipped.
    """
    total = sum(1 for _ in Path(json_dir).glob("*.json"))
    if not total:
        raise click.ClickException(f"no NLP result files (*.json) in {json_dir}")
    # The bar goes to stderr, so that stdout holds just the summary.
    with click.progressbar(length=total, label="importing", file=sys.stderr) as bar:
        summary = import_folder(json_dir, text_dir, meta_dir, batch_size, progress=bar.update)
    click.echo(f"imported {summary.imported}, replaced {summary.replaced}, skipped {len(summary.skipped)}")
    for file_name, reason in summary.skipped:
        click.echo(f"skipped {file_name}: {reason}")
    if not summary.imported and not summary.replaced:
        raise click.ClickException(f"every file was skipped ({total})")


@admin_command(storage_group, "sweep")
@click.option("--min-age-hours", default=24.0, show_default=True, type=click.FloatRange(min=1),
              help="Only files last written longer ago than this: never an upload in flight.")
@click.option("--dry-run", is_flag=True, help="List what would be removed, and remove nothing.")
def storage_sweep(min_age_hours, dry_run):
    """Remove files that no row refers to (a crash's or a failed removal's) and stale upload temp files."""
    count = total = 0
    try:
        for name, size in sweep_storage(min_age_hours * 3600, remove=not dry_run):
            count, total = count + 1, total + size
            click.echo(name)
    except OSError as error:
        raise click.ClickException(f"stopped after {count} files: {error}") from None
    click.echo(f"{'would remove' if dry_run else 'removed'} {count} files ({total / 1e6:.1f} MB)")


@admin_command(transactions_group, "list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100_000))
def transactions_list(limit):
    """The latest searches, newest first: time (UTC), transaction id, call, client, results, query."""
    for row in recent_transactions(limit):
        time = row.created_at.isoformat(timespec="seconds") + "Z"
        click.echo("\t".join(map(str, (time, row.id, row.call, row.client_address, row.num_results, row.query))))


@contextmanager
def _progress_bar(label):
    """A progress bar on standard error for a loader that reports (bytes read, bytes in all)."""
    with click.progressbar(length=1, label=label, file=sys.stderr) as bar:

        def report(done, total):
            bar.length = total  # known only once the loader has found its files
            bar.update(done - bar.pos)

        yield report


@admin_command(concepts_group, "load")
@click.option("--umls-dir", type=click.Path(file_okay=False), help="UMLS files MRCONSO.RRF, MRSTY.RRF, MRREL.RRF.")
@click.option("--sources", help="With --umls-dir: the sources (SAB) whose narrower relations are kept, comma-separated"
              f"  [default: {','.join(DEFAULT_SOURCES)}]")
@click.option("--semehr-csv-dir", type=click.Path(file_okay=False),
              help="cui.csv, rel.csv, snomed.csv, sty.csv of a SemEHR deployment.")
@click.option("--sample", is_flag=True, help="The built-in radiology sample.")
def concepts_load(umls_dir, sources, semehr_csv_dir, sample):
    """Replace the concept dictionary with the files of one source."""
    if (umls_dir is not None) + (semehr_csv_dir is not None) + sample != 1:
        raise click.ClickException("give exactly one of --umls-dir, --semehr-csv-dir and --sample")
    if sources is not None and umls_dir is None:
        raise click.ClickException("--sources goes with --umls-dir")
    source_list = DEFAULT_SOURCES if sources is None else tuple(filter(None, (s.strip() for s in sources.split(","))))
    if not source_list:
        raise click.ClickException("--sources names no source")
    with _progress_bar("Loading the concept dictionary") as progress:
        if umls_dir is not None:
            summary = load_umls(umls_dir, source_list, progress)
        elif semehr_csv_dir is not None:
            summary = load_semehr_csv(semehr_csv_dir, progress)
        else:
            summary = load_sample(progress)
    click.echo(f"concept dictionary loaded: {summary}")


@click.command("demo")
@with_appcontext
@_fail_on_value_error
def demo_command():
    """Seed the demo data (idempotent)."""
    init_db()
    for line in seed_demo():
        click.echo(line)


@click.command("annotate")
@click.option("--project", help="With --archive: only the SR instances of this archive (else those of every archive).")
@click.option("--archive", help="With --project: the archive.")
@click.option("--text-dir", type=click.Path(exists=True, file_okay=False),
              help="Instead: the text reports (NAME.txt) of this folder, stored as documents.")
@click.option("--meta-dir", type=click.Path(exists=True, file_okay=False),
              help="With --text-dir: their DICOM metadata (NAME.json: SOPInstanceUID, ContentDate, …).")
@with_appcontext
@_needs_current_schema
@_fail_on_value_error
def annotate_command(project, archive, text_dir, meta_dir):
    """Annotate the stored SR reports again (after the dictionary changed), or a folder of text reports."""
    from .reports.annotating import annotate_stored, annotate_texts  # spaCy: only the commands that annotate load it

    if (project is None) != (archive is None):
        raise click.ClickException("give --project and --archive together")
    if text_dir is not None:
        if project is not None:
            raise click.ClickException("--text-dir goes without --project and --archive")
        with _progress_bar("annotating") as progress:
            stored, replaced = annotate_texts(text_dir, meta_dir, progress)
        click.echo(f"annotated {stored + replaced} text reports: {stored} new, {replaced} replaced")
        return
    if meta_dir is not None:
        raise click.ClickException("--meta-dir goes with --text-dir")
    archive_id = None if project is None else archive_by_name(project, archive).id
    with _progress_bar("annotating") as progress:
        queued, state = annotate_stored(archive_id, progress)
    click.echo(f"annotated {queued - state.pending - len(state.failed)} of {queued} SR reports")
    for sop_instance_uid, attempts, reason in state.failed:
        click.echo(f"failed {sop_instance_uid} after {attempts} attempts: {reason}")
    if state.pending:
        click.echo(f"{state.pending} still queued: being read by another worker, or to be tried again")


@click.command("worker")
@click.option("--poll-seconds", default=1.0, show_default=True, type=click.FloatRange(0.1, 60),
              help="How often an idle worker looks at the queue.")
@click.option("--stop-with-parent", is_flag=True, hidden=True, help="Stop when the process that started it ends.")
@with_appcontext
@_needs_current_schema
def worker_command(poll_seconds, stop_with_parent):
    """Annotate the SR reports that uploads queue, until stopped (gateway serve runs one itself)."""
    from .reports.worker import run_worker  # spaCy: only the commands that annotate load it

    logging.basicConfig(level=logging.INFO, format="%(asctime)s [report worker %(process)d] %(levelname)s %(message)s")
    run_worker(poll_seconds, stop_with_parent=stop_with_parent)


@click.command("serve")
@click.option("--bind", default="127.0.0.1:8080", show_default=True)
@click.option("--workers", default=SETTINGS["workers"], show_default=True, type=click.IntRange(1, 64),
              help="Worker processes (one per core or so).")
@click.option("--threads", default=SETTINGS["threads"], show_default=True, type=click.IntRange(1, 256),
              help="Requests each worker answers at once.")
@click.option("--timeout", default=SETTINGS["timeout"], show_default=True, type=click.IntRange(1),
              help="Seconds a worker may stop answering gunicorn before it is restarted (not a request's limit).")
@click.option("--report-workers", default=1, show_default=True, type=click.IntRange(0, 16),
              help="Processes that annotate uploaded SR reports (as `gateway worker` does); 0 for none.")
@with_appcontext
@_needs_current_schema
def serve_command(bind, workers, threads, timeout, report_workers):
    """Serve the gateway with gunicorn (threaded workers), and annotate uploaded reports."""
    db.engine.dispose()  # the workers make their own connections (and apps) after the fork
    serve(create_app, bind, workers, threads, timeout, report_workers)


COMMANDS = (
    init_db_command,
    db_group,
    user_group,
    project_group,
    archive_group,
    results_group,
    series_group,
    form_group,
    concepts_group,
    transactions_group,
    mappings_group,
    annotations_group,
    storage_group,
    demo_command,
    annotate_command,
    worker_command,
    serve_command,
)


def register_commands(app):
    """The commands on app.cli too: Flask's test CLI runner invokes them there."""
    for command in COMMANDS:
        app.cli.add_command(command)


def _create_app():
    try:
        return create_app()
    except ValueError as error:  # a bad GATEWAY_* setting
        raise click.ClickException(str(error)) from None


# A plain click group, not Flask's: its own options and commands (--app, run, shell, routes) do nothing here.
@click.group("gateway", help="Administer and serve the imaging research gateway.")
@click.pass_context
def main(context):
    # with_appcontext makes the commands' app from this ScriptInfo; a caller (a test) may pass its own
    if context.obj is None:
        context.obj = ScriptInfo(create_app=_create_app, set_debug_flag=False)


for _command in COMMANDS:
    main.add_command(_command)
