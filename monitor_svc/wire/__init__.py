"""The monitor's wire-level speed code, kept apart from the plain translation (``convert``)
and handlers (``servicer``): answers spliced from cached serialized bytes (``answers``) and
the registration that sends such bytes as they are (``prebuilt``)."""
