"""The MQTT topics of the platform contract (docs/asyncapi.yaml), and the broker ACL
written from them: one copy of the topic root."""

from __future__ import annotations

TOPIC_ROOT = "smartcorr/v1/gw"
#: The MQTT user name (certificate common name) of the platform's consumers.
PLATFORM_CN = "platform-verifier"
#: The certificate CN of the platform's command publisher (``ingest command``): the only
#: client that may write a gateway's command topic.
COMMAND_CN = "platform-commands"
#: Enrolment (docs/enrolment.md): a client writes its request and reads its answer under
#: ``ENROL_ROOT/<its MQTT client id>/``: a request id on the bootstrap listener, the
#: gateway id (= its certificate's CN) on the gateways' listener (renewal).
ENROL_ROOT = "smartcorr/v1/enrol"
#: The certificate CN of the platform's enrolment service (``ingest enrol-service``).
ENROL_CN = "platform-enrolment"
#: The MQTT user name an unenrolled gateway connects with (a password shared by the
#: installers' kits, on the bootstrap listener). The '.' keeps it from ever being a
#: gateway id (core: 3-63 of a-z, 0-9, '-').
BOOTSTRAP_USER = "enrol.bootstrap"


def records_topic(gateway_id: str) -> str:
    """Where a gateway publishes its record batches."""
    return f"{TOPIC_ROOT}/{gateway_id}/records"


def status_topic(gateway_id: str) -> str:
    """A gateway's retained online/offline status (and its Last Will)."""
    return f"{TOPIC_ROOT}/{gateway_id}/status"


def check_topic(gateway_id: str) -> str:
    """Where ``provision check`` publishes its test message (QoS 1, not retained): under
    the gateway's own prefix, so the broker's PUBACK says whether its ACL lets the gateway
    publish; no one subscribes to it (docs/provision-check.md)."""
    return f"{TOPIC_ROOT}/{gateway_id}/check"


def commands_topic(gateway_id: str) -> str:
    """The platform's signed commands to one gateway (docs/commands.md): QoS 1, read by
    that gateway alone, written by the platform's command publisher alone."""
    return f"{TOPIC_ROOT}/{gateway_id}/cmd"


def diag_topic(gateway_id: str, request: str) -> str:
    """Where a gateway sends the chunks of the diagnostic bundle the platform asked for
    (``request-diag``, docs/commands.md): written by that gateway alone, read by the
    platform's command publisher (which asked)."""
    return f"{TOPIC_ROOT}/{gateway_id}/diag/{request}"


def enrol_request_topic(client_id: str) -> str:
    """Where the client *client_id* publishes its enrolment request."""
    return f"{ENROL_ROOT}/{client_id}/request"


def enrol_answer_topic(client_id: str) -> str:
    """Where the platform answers the client *client_id*."""
    return f"{ENROL_ROOT}/{client_id}/answer"


def broker_acl(platform_user: str = PLATFORM_CN, *, enrol_user: str = ENROL_CN,
               bootstrap_user: str = BOOTSTRAP_USER, command_user: str = COMMAND_CN) -> str:
    """The mosquitto ACL a province deploys: a gateway (user = the CN of its certificate,
    ``%u``) writes only under its own prefix; the platform reads every gateway. Every
    client may use the enrolment topics of its own client id (``%c``); the bootstrap user
    nothing else (its ``deny`` lines come before any pattern's grant)."""
    return "\n".join([
        "# gateways: only under their own prefix",
        f"pattern write {records_topic('%u')}",
        f"pattern write {status_topic('%u')}",
        f"pattern write {check_topic('%u')}",
        f"pattern read {commands_topic('%u')}",
        f"pattern write {diag_topic('%u', '+')}",
        "# enrolment (and renewal): under the client's own id",
        f"pattern write {enrol_request_topic('%c')}",
        f"pattern read {enrol_answer_topic('%c')}",
        "",
        f"user {platform_user}",
        f"topic read {records_topic('+')}",
        f"topic read {status_topic('+')}",
        "",
        "# commands (docs/commands.md): the command publisher alone writes them; a gateway",
        "# reads its own (above) and writes none",
        f"user {command_user}",
        f"topic write {commands_topic('+')}",
        f"topic read {diag_topic('+', '+')}",
        "",
        f"user {enrol_user}",
        f"topic read {enrol_request_topic('+')}",
        f"topic write {enrol_answer_topic('+')}",
        "",
        f"user {bootstrap_user}",
        f"topic deny {TOPIC_ROOT}/#",
        "",
    ])
