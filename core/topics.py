"""The MQTT topics of the platform contract (docs/asyncapi.yaml), and the broker ACL
written from them: one copy of the topic root."""

from __future__ import annotations

TOPIC_ROOT = "smartcorr/v1/gw"
#: The MQTT user name (certificate common name) of the platform's consumers.
PLATFORM_CN = "platform-verifier"


def records_topic(gateway_id: str) -> str:
    """Where a gateway publishes its record batches."""
    return f"{TOPIC_ROOT}/{gateway_id}/records"


def status_topic(gateway_id: str) -> str:
    """A gateway's retained online/offline status (and its Last Will)."""
    return f"{TOPIC_ROOT}/{gateway_id}/status"


def commands_topic(gateway_id: str) -> str:
    """The platform's commands to one gateway (a wildcard filter below it)."""
    return f"{TOPIC_ROOT}/{gateway_id}/cmd/#"


def broker_acl(platform_user: str = PLATFORM_CN) -> str:
    """The mosquitto ACL a province deploys: a gateway (user = the CN of its certificate,
    ``%u``) writes only under its own prefix; the platform reads every gateway."""
    return "\n".join([
        "# gateways: only under their own prefix",
        f"pattern write {records_topic('%u')}",
        f"pattern write {status_topic('%u')}",
        f"pattern read {commands_topic('%u')}",
        "",
        f"user {platform_user}",
        f"topic read {records_topic('+')}",
        f"topic read {status_topic('+')}",
        f"topic write {commands_topic('+')}",
        "",
    ])
