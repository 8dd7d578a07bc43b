"""Production enrolment: broker accounts, device credentials and the dev CA (``order-enrol``).

An operator installs it alone (``pip install .[enrol]``): it needs the wire
contract's names (``schemas``), the URL parser (``servicekit.urls``) and
``cryptography``, never the simulator or the test rig.

* ``provision``: the registry directory; enrol, revoke, service accounts.
* ``dynsec``: the broker's accounts and rights (Mosquitto dynamic-security file).
* ``control``: the same, changed live on a running broker (``--live``).
* ``pki``: a small development CA and certificates.
* ``audit``: ``order-enrol check``, what is wrong with a registry.
* ``files``: registry writes with the right mode, atomically.
"""

from .provision import Enrolment, ProvisionError, Registry

__all__ = ["Enrolment", "ProvisionError", "Registry"]
