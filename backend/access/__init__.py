"""Who may call the API: API keys with a role (operator, courier bound to one carrier, researcher).

Where it sits in a message's journey: at the door of the API. Nothing here touches MQTT or ingest;
a request's key is checked before any box data is read or any command is sent.
"""
