"""moekit.lab.data.mail_text: a mail's readable body, without headers, MIME structure, transfer encodings or
HTML markup."""

import base64

from moekit.lab.data.mail_text import html_to_text, mail_body_text


def test_the_headers_go_and_the_body_stays():
    raw = ("From: alice@example.com\nTo: bob@example.com\nSubject: Lunch\nX-Spam-Status: No\n\n"
           "Shall we meet at noon?\n\n> earlier text\n-- \nAlice\n")
    assert mail_body_text(raw) == "Shall we meet at noon?\n\n> earlier text\n--\nAlice"


def test_quoted_printable_and_base64_are_decoded_with_their_charset():
    qp = ("Subject: x\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable\n\n"
          "Caf=E9 au lait, a long line that was =\nwrapped.\n")
    assert mail_body_text(qp) == "Café au lait, a long line that was wrapped."
    body = base64.b64encode("naïve text in UTF-8".encode()).decode()
    b64 = f"Subject: y\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n{body}\n"
    assert mail_body_text(b64.encode()) == "naïve text in UTF-8"


def test_an_unknown_charset_falls_back_to_latin1():
    raw = b"Subject: z\nContent-Type: text/plain; charset=x-no-such-charset\n\nna\xefve\n"
    assert mail_body_text(raw) == "naïve"


def test_html_is_reduced_to_its_text():
    assert html_to_text("<html><head><title>T</title><style>p {color: red}</style></head><body><p>Buy&nbsp;now"
                        " &amp; save!</p><p>Only <b>$5</b></p><script>x()</script><br>Bye</body></html>") \
        == "Buy now & save!\n\nOnly $5\n\nBye"


def test_multipart_alternative_prefers_the_plain_part_and_drops_attachments():
    raw = """Subject: m
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="OUT"

--OUT
Content-Type: multipart/alternative; boundary="IN"

--IN
Content-Type: text/plain

Plain words.
--IN
Content-Type: text/html

<p>HTML words.</p>
--IN--
--OUT
Content-Type: text/plain; name="notes.txt"
Content-Disposition: attachment; filename="notes.txt"

attached file
--OUT--
"""
    assert mail_body_text(raw) == "Plain words."


def test_an_html_only_mail_and_html_in_a_plain_part_become_text():
    html_only = "Subject: h\nContent-Type: text/html\n\n<html><body><h1>Offer</h1><p>Click here</p></body></html>\n"
    assert mail_body_text(html_only) == "Offer\n\nClick here"
    disguised = "Subject: d\n\n<HTML><BODY><FONT size=2>Cheap&nbsp;pills</FONT><BR>today</BODY></HTML>\n"
    assert mail_body_text(disguised) == "Cheap pills\ntoday"


def test_a_mail_without_a_text_part_is_blank():
    raw = "Subject: i\nContent-Type: image/png\nContent-Transfer-Encoding: base64\n\niVBORw0KGgo=\n"
    assert mail_body_text(raw) == ""
