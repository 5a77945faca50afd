"""One set of rules for base64 data URLs, whichever side reads them: the encoder (the ensemble's
`images` and `videos`) and the OpenAI service (`image_url`) accept and refuse the same URLs,
with the same message."""

from __future__ import annotations

import base64

import pytest

from qwen3vl.data_url import DataURLError, decode_data_url, file_bytes, is_data_url
from qwen3vl.encoder.images import ImageError, image_file_bytes
from qwen3vl.encoder.video import VideoError, video_file_bytes
from qwen3vl.openai.errors import APIError
from qwen3vl.openai.images import decode_data_url as openai_decode

FILE = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
B64 = base64.b64encode(FILE).decode()


@pytest.mark.parametrize("url", [
    f"data:image/png;base64,{B64}",
    f"DATA:image/png;base64,{B64}",            # the scheme in any case
    f"Data:IMAGE/PNG;BASE64,{B64}",
    f"data:;base64,{B64}",                     # no media type
    f"data:image;base64,{B64}",                # what qwen3vl.client's generate_body sends
    f"data:application/octet-stream;base64,{B64}",
    f"data:image/png;name=a.png;base64,{B64}",  # other parameters
    "data:image/png;base64," + "\r\n".join(B64[i:i + 76] for i in range(0, len(B64), 76)) + "\n",
])
def test_accepted_the_same_everywhere(url):
    assert is_data_url(url) and is_data_url(url.encode())
    assert decode_data_url(url, "images[0]", "image") == FILE
    assert image_file_bytes(url.encode(), 0) == FILE
    assert openai_decode(url, "images[0]", 10**6) == FILE


@pytest.mark.parametrize("url, problem", [
    ("data:image/png;base64", "needs a ',' before its data"),
    ("data:image/png," + B64, "must be base64"),
    ("data:image/png;base64,ab$d", "bad base64 in data URL"),
    ("data:text/plain;base64," + B64, "of type 'text/plain' is not an image"),
])
def test_refused_the_same_everywhere_with_the_same_message(url, problem):
    with pytest.raises(DataURLError, match=problem) as shared:
        decode_data_url(url, "images[0]", "image")
    assert str(shared.value).startswith("images[0]: ")
    with pytest.raises(ImageError) as encoder:
        image_file_bytes(url.encode(), 0)
    with pytest.raises(APIError) as api:
        openai_decode(url, "images[0]", 10**6)
    assert str(encoder.value) == api.value.message == str(shared.value)
    assert api.value.status == 400 and api.value.param == "images[0]"


def test_files_pass_as_they_are_and_videos_follow_the_same_rules():
    assert file_bytes(FILE, "images[0]", "image") == FILE
    assert video_file_bytes(b"data:video/mp4;base64," + base64.b64encode(FILE), 1) == FILE
    with pytest.raises(VideoError, match=r"videos\[1\]: a data URL of type 'image/png' is not a video"):
        video_file_bytes(b"data:image/png;base64," + base64.b64encode(FILE), 1)


def test_a_size_limit_is_its_own_problem():
    with pytest.raises(DataURLError, match="the image is larger than this server's limit of 10 bytes") as e:
        decode_data_url(f"data:image/png;base64,{B64}", "p", "image", max_bytes=10)
    assert e.value.too_large
    with pytest.raises(APIError) as api:
        openai_decode(f"data:image/png;base64,{B64}", "p", 10)
    assert api.value.code == "image_too_large"
