"""The metric names are said once, in observability.METRICS: the code emits
only those, terraform/*.tf names only those under the app's namespace, and
the dashboard shows every one of them.

The Terraform is read as text, in the forms terraform/monitoring.tf uses; a
use of var.metrics_namespace in any other form fails the test, so no metric
can hide from it. (The deployed dashboard is checked too, after `terraform
apply` on moto: tests/terraform_emulator.py.)
"""

import json
import re

import pytest
from conftest import ROOT

import observability
import settings

NAMESPACE = "var.metrics_namespace"
# An alarm on one of the app's metrics: its namespace, then its metric_name.
ALARM_NAMESPACE = re.compile(
    r"^\s*namespace\s*=\s*var\.metrics_namespace\s*$", re.MULTILINE
)
ALARM = re.compile(
    r"^\s*namespace\s*=\s*var\.metrics_namespace\s*\n\s*metric_name\s*=\s*\"(\w+)\"",
    re.MULTILINE,
)
# Dashboard entries: [var.metrics_namespace, "Name", ...], a SEARCH of the
# app's namespace for MetricName="Name", or either with `name` from a loop,
# `for name in ["A", "B"] : ...`.
LOOP = re.compile(r"\[for name in \[((?:\s*\"\w+\",?)+)\] : (.*)\]\s*$")
ENTRY = re.compile(r"\[var\.metrics_namespace, (?:\"(\w+)\"|(name)),")
SEARCH = re.compile(
    r"SEARCH\('\{\\\"\$\{var\.metrics_namespace\}\\\",route\} "
    r"MetricName=\\\"(?:(\w+)|\$\{(name)\})\\\""
)
# References that name no metric: how the namespace reaches the function, its
# validation, and comments.
NOT_A_METRIC = re.compile(
    r"^\s*(#|condition\s*=|METRICS_NAMESPACE\s*=\s*var\.metrics_namespace\s*$)"
)


def terraform_sources() -> dict[str, str]:
    return {
        path.name: path.read_text()
        for path in sorted((ROOT / "terraform").glob("*.tf"))
    }


def names_in(line: str) -> list[str]:
    """The app's metric names a dashboard line shows ([] for any other line)."""
    loop = LOOP.search(line)
    looped = re.findall(r"\"(\w+)\"", loop[1]) if loop else []
    names = []
    for match in [*ENTRY.finditer(line), *SEARCH.finditer(line)]:
        literal, variable = match.groups()
        names += [literal] if literal else looped if variable else []
    return names


def app_metrics_in_terraform(
    sources: dict[str, str],
) -> tuple[list[str], list[str], list[str]]:
    """The app's metric names the alarms use, those the dashboard shows, and
    every line that references the namespace in a form not read here."""
    alarms, dashboard, unread = [], [], []
    for file, source in sources.items():
        found = ALARM.findall(source)
        alarms += found
        if len(found) != len(ALARM_NAMESPACE.findall(source)):
            unread.append(
                f"{file}: an alarm on the namespace whose metric_name is not next"
            )
        for number, line in enumerate(source.splitlines(), 1):
            if NAMESPACE not in line:
                continue
            shown = names_in(line)
            dashboard += shown
            if not (shown or NOT_A_METRIC.match(line) or ALARM_NAMESPACE.match(line)):
                unread.append(f"{file}:{number}: {line.strip()}")
    return alarms, dashboard, unread


def test_every_use_of_the_apps_namespace_in_terraform_is_read():
    *_, unread = app_metrics_in_terraform(terraform_sources())
    assert unread == []


def test_terraform_names_only_metrics_the_app_emits():
    alarms, dashboard, _ = app_metrics_in_terraform(terraform_sources())
    assert set(alarms) == {
        "OldestPendingAgeSeconds",
        "PendingJobs",
        "EventsPublishFailed",
    }
    assert set(alarms) | set(dashboard) <= set(observability.METRICS)


def test_the_dashboard_shows_every_metric_the_app_emits_once():
    _, dashboard, _ = app_metrics_in_terraform(terraform_sources())
    assert sorted(dashboard) == sorted(observability.METRICS)


def _changed(old: str, new: str) -> dict[str, str]:
    sources = terraform_sources()
    assert old in sources["monitoring.tf"]
    return {**sources, "monitoring.tf": sources["monitoring.tf"].replace(old, new, 1)}


def test_the_reader_sees_a_misspelt_a_missing_and_an_unread_metric():
    """The checks above can fail."""
    _, dashboard, _ = app_metrics_in_terraform(
        _changed('"JobsClaimed"', '"JobClaimed"')
    )
    assert "JobClaimed" in dashboard and "JobsClaimed" not in dashboard
    widget = (
        '[[var.metrics_namespace, "OldestPendingAgeSeconds", { stat = "Maximum" }]]'
    )
    _, dashboard, _ = app_metrics_in_terraform(_changed(widget, "[]"))
    assert "OldestPendingAgeSeconds" not in dashboard
    alarms, _, unread = app_metrics_in_terraform(
        _changed(
            '  namespace           = var.metrics_namespace\n  metric_name         = "PendingJobs"',
            '  metric_name         = "PendingJobs"\n  namespace           = var.metrics_namespace',
        )
    )
    assert "PendingJobs" not in alarms and len(unread) == 1
    entry = _changed(widget, "[[var.metrics_namespace, local.a_name]]")
    assert len(app_metrics_in_terraform(entry)[2]) == 1


@pytest.fixture
def emitted(monkeypatch, capsys):
    """The EMF records printed while metrics are on."""
    monkeypatch.setattr(
        observability, "settings", settings.settings_from_env({"METRICS_ENABLED": "1"})
    )

    def read() -> dict[str, str]:
        units = {}
        for line in capsys.readouterr().out.splitlines():
            if '"_aws"' in line:
                record = json.loads(line)["_aws"]["CloudWatchMetrics"][0]
                units |= {m["Name"]: m["Unit"] for m in record["Metrics"]}
        return units

    return read


def test_the_code_emits_each_metric_with_its_unit_from_metrics(emitted):
    for name in observability.DOMAIN_COUNTERS:
        observability.count(name)
    observability.publish_job_gauges(observability.JobGauges(1, 2, 3.5))
    units = emitted()
    expected = observability.DOMAIN_COUNTERS | observability.JOB_GAUGES
    assert units == expected
    assert all(observability.METRICS[name] == unit for name, unit in units.items())


def test_an_unknown_metric_is_refused(emitted):
    with pytest.raises(ValueError, match="unknown domain counter"):
        observability.count("Requests")  # a request metric, not a counter
    with pytest.raises(ValueError):
        observability.count("JobsRetried")
    assert emitted() == {}
