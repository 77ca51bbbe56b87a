"""Image encoding, done on the replica so only compressed bytes travel back."""

from __future__ import annotations

import io
from xml.sax.saxutils import quoteattr

from PIL import Image
from PIL.PngImagePlugin import PngInfo

_PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
# IPTC's term for media a trained model generated, as the EU AI Act's Article 50 asks
# generated images to be marked in a machine-readable way.
GENERATED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def encode_image(image: Image.Image, fmt: str, quality: int, label: str | None = None) -> bytes:
    """Encode to png (lossless, `quality` ignored), webp or jpeg at `quality` (1-100). With
    a `label` (the model's id), the image's XMP metadata says a trained model generated
    it, and which; the pixels are the same either way."""
    buf, xmp = io.BytesIO(), None if label is None else _xmp(label)
    if fmt == "png":
        info = None
        if xmp is not None:  # PNG's place for XMP: an iTXt chunk under this keyword
            info = PngInfo()
            info.add_itxt("XML:com.adobe.xmp", xmp)
        image.save(buf, format="PNG", pnginfo=info)
    else:
        extra = {} if xmp is None else {"xmp": xmp.encode()}
        image.convert("RGB").save(buf, format=_PIL_FORMATS[fmt], quality=quality, **extra)
    return buf.getvalue()


def _xmp(label: str) -> str:
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/">'
            '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description rdf:about=""'
            ' xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
            ' xmlns:xmp="http://ns.adobe.com/xap/1.0/"'
            f' Iptc4xmpExt:DigitalSourceType="{GENERATED}"'
            f' xmp:CreatorTool={quoteattr(f"Atelier ({label})")}/>'
            '</rdf:RDF></x:xmpmeta>')
