"""A test CA and a signing certificate in C2PA's profile (ES256), written as an operator
would give them, and what a C2PA reader finds in an image."""

import datetime
import io
import json
from pathlib import Path


def save_signing_files(folder: Path) -> tuple[Path, Path]:
    """(PEM chain: the signing certificate, then its CA's; PEM key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject, key, issuer, issuer_key, ca: bool):
        usage = {name: False for name in (
            "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
            "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")}
        usage |= {"key_cert_sign": True, "crl_sign": True} if ca else {"digital_signature": True}
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=365))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
                   .add_extension(x509.KeyUsage(**usage), True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       issuer_key.public_key()), False))
        if not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        return builder.sign(issuer_key, hashes.SHA256())

    def name(common):
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Atelier tests"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate(name("Test CA"), ca_key, name("Test CA"), ca_key, ca=True)
    leaf = certificate(name("Atelier signer"), key, ca.subject, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (folder / "chain.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (folder / "key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder / "chain.pem", folder / "key.pem"


def read_credentials(data: bytes, media_type: str) -> tuple[str, list[str], dict] | None:
    """(validation state, validation status codes, the created action) of an image's
    active C2PA manifest; None if it has none."""
    import c2pa

    try:
        with c2pa.Reader(media_type, io.BytesIO(data)) as reader:
            store = json.loads(reader.json())
    except c2pa.C2paError.ManifestNotFound:
        return None
    manifest = store["manifests"][store["active_manifest"]]
    (actions,) = [a["data"]["actions"] for a in manifest["assertions"]
                  if a["label"].startswith("c2pa.actions")]
    return (store["validation_state"],
            [s["code"] for s in store.get("validation_status", [])], actions[0])
