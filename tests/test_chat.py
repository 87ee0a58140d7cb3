"""`kataru chat` on a real pseudo-terminal, as a person types: a conversation longer than the context goes on,
Ctrl-C mid-reply returns to the prompt with the history kept, readline recalls lines, Ctrl-D ends it."""

from __future__ import annotations

import codecs
import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "ユーザー> "


class Terminal:
    """`kataru chat ...` as the foreground process of a new pseudo-terminal."""

    def __init__(self, *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: kataru, with the pty as its terminal
            os.chdir(ROOT)
            os.execv(sys.executable, [sys.executable, "-m", "kataru", "chat", *args])
        # a wide terminal: readline redraws wrapped lines with cursor moves, which would split what is matched
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 4000, 0, 0))
        self.seen = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # keeps a split character

    def read_until(self, text: str, timeout: float = 120, after: int = 0) -> str:
        """Everything the terminal showed until `text` appears past position `after` (of all output so far)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen[after:]:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {text!r}; the terminal showed:\n{self.seen[-2000:]}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                self.seen += self.decoder.decode(chunk)
        assert text in self.seen[after:], self.seen[-2000:]
        return self.seen

    def wait_for_readline(self, timeout: float = 60) -> None:
        """Until readline has the terminal (it turns canonical mode off while it reads a line): keys sent
        before that are the terminal's own to echo, and a Ctrl-C would not reach readline's loop."""
        deadline = time.monotonic() + timeout
        while termios.tcgetattr(self.fd)[3] & termios.ICANON:
            assert time.monotonic() < deadline, f"readline never took the terminal:\n{self.seen[-2000:]}"
            time.sleep(0.02)
        time.sleep(0.1)  # from its raw mode to its read loop

    def type(self, keys: str | bytes) -> int:
        """Send keys; returns where the output stood before them."""
        mark = len(self.seen)
        os.write(self.fd, keys.encode() if isinstance(keys, str) else keys)
        return mark

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            self.read_ready()
            time.sleep(0.05)
        os.kill(self.pid, 9)
        raise AssertionError(f"kataru chat did not exit; the terminal showed:\n{self.seen[-1000:]!r}")

    def read_ready(self) -> None:
        while select.select([self.fd], [], [], 0)[0]:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                return
            if not chunk:
                return
            self.seen += self.decoder.decode(chunk)


def test_a_conversation_longer_than_the_context_goes_on(checkpoints: dict) -> None:
    """The test model's context is 256 tokens: each turn here is about 100, so from the third turn on the
    oldest turns are dropped, said on stderr, and the chat answers every message."""
    chat = Terminal(str(checkpoints["llama"][0]), "--temperature", "0", "--max-new-tokens", "40", "--ignore-eos")
    chat.read_until(PROMPT)
    message = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。" * 2
    for turn in range(5):
        mark = chat.type(message + "\n")
        chat.read_until(PROMPT, after=mark + 1)
        if turn >= 2:
            assert "oldest messages were dropped to fit the model's context of 256 tokens" in chat.seen[mark:]
    mark = chat.type("猫" * 400 + "\n")  # one message longer than the context alone: refused, the chat goes on
    chat.read_until(PROMPT, after=mark + 1)
    assert "more than the model's context of 256; shorten it" in chat.seen[mark:]
    mark = chat.type("/reset\n")
    chat.read_until(PROMPT, after=mark)
    assert "(the conversation was reset: " in chat.seen[mark:]
    chat.type(b"\x04")  # Ctrl-D: the chat ends, on a new line
    assert chat.wait() == 0
    assert chat.seen.rstrip(" ").endswith(PROMPT + "\r\n") or chat.seen.endswith("\n")


@pytest.mark.skipif(not (ROOT / "kataru" / "models" / "kataru-tiny-ja").is_dir(), reason="no embedded model")
def test_ctrl_c_stops_the_reply_not_the_chat_and_readline_recalls_lines() -> None:
    """The embedded model writes a long reply (900 tokens, a few seconds); Ctrl-C stops it, the prompt comes
    back, and the partial answer stays in the history: /reset forgets the question and that answer."""
    chat = Terminal("--max-new-tokens", "900", "--ignore-eos", "--seed", "0")
    chat.read_until(PROMPT)
    mark = chat.type("日本の首都はどこですか\n")
    chat.read_until("。", after=mark + 20)  # the reply is streaming
    chat.type(b"\x03")  # Ctrl-C
    chat.read_until("(stopped)", after=mark, timeout=30)
    chat.read_until(PROMPT, after=mark + 1)
    mark = chat.type("/reset\n")
    after = chat.read_until("(the conversation was reset: 2 messages forgotten)", after=mark).rindex("forgotten")
    chat.read_until(PROMPT, after=after)
    chat.wait_for_readline()
    mark = chat.type(b"\x1b[A\n")  # the up arrow recalls /reset (readline's history), Enter sends it again
    after = chat.read_until("(the conversation was reset: 0 messages forgotten)", after=mark).rindex("forgotten")
    chat.read_until(PROMPT, after=after)
    chat.wait_for_readline()
    mark = chat.type(b"\x03")  # Ctrl-C at the prompt: a fresh line and a new prompt, not the end
    chat.read_until(PROMPT, after=mark)
    chat.type("/exit\n")
    assert chat.wait() == 0
