"""Server process models for netwatch's owner tests, on 127.0.0.1.

Usage: models.py MODEL, with MODEL one of
  prefork  two pre-forked workers share the listener; a worker accepts
           (and a thread of it serves)
  fork     the parent accepts, forks a child that serves, closes its copy
  scm      the parent accepts and passes the fd to a worker over a unix
           socket (SCM_RIGHTS), then closes its copy
  threads  the parent accepts, a thread of the same process serves
  exec     the parent accepts and forks; the child makes the socket its
           stdin and stdout and execs cat
  pingpong the parent (on the first CPU) accepts and answers the first
           line, a child it forks (on the last CPU) answers the second, the
           parent the third: the socket goes to the child and back, and
           what the parent's CPU remembers of it is stale

Prints "listening PORT PID" once, then "serving PEER_PORT PID" for each
connection, from the process that serves it (before exec, for exec).
Serving: read a line, answer "PID\n" (cat echoes the line instead), read
until the peer closes, close. Runs until killed; it is started in a
process group of its own, so that the test kills every process at once.
"""

import os
import socket
import sys
import threading


def say(*words):
    print(*words, flush=True)


def serve(conn):
    reader = conn.makefile("rb")
    reader.readline()
    conn.sendall(f"{os.getpid()}\n".encode())
    while conn.recv(4096):
        pass
    reader.close()
    conn.close()


def peer_port(conn):
    return conn.getpeername()[1]


def prefork(listener):
    for _ in range(2):
        if os.fork() == 0:
            threads(listener)
    while True:
        os.wait()


def fork(listener):
    while True:
        conn, _ = listener.accept()
        child = os.fork()
        if child == 0:
            listener.close()
            say("serving", peer_port(conn), os.getpid())
            serve(conn)
            os._exit(0)
        conn.close()
        reap()


def scm(listener):
    parent_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    worker = os.fork()
    if worker == 0:
        listener.close()
        while True:
            _, fds, _, _ = socket.recv_fds(worker_end, 16, 1)
            conn = socket.socket(fileno=fds[0])
            say("serving", peer_port(conn), os.getpid())
            threading.Thread(target=serve, args=(conn,)).start()
    while True:
        conn, _ = listener.accept()
        socket.send_fds(parent_end, [b"fd"], [conn.fileno()])
        conn.close()


def threads(listener):
    while True:
        conn, _ = listener.accept()
        say("serving", peer_port(conn), os.getpid())
        threading.Thread(target=serve, args=(conn,)).start()


def exec_cat(listener):
    while True:
        conn, _ = listener.accept()
        child = os.fork()
        if child == 0:
            say("serving", peer_port(conn), os.getpid())
            os.dup2(conn.fileno(), 0)
            os.dup2(conn.fileno(), 1)
            os.execvp("cat", ["cat"])
        conn.close()
        reap()


def pingpong(listener):
    os.sched_setaffinity(0, {0})
    while True:
        conn, _ = listener.accept()
        say("serving", peer_port(conn), os.getpid())
        reader = conn.makefile("rb")
        answer = lambda: (reader.readline(), conn.sendall(f"{os.getpid()}\n".encode()))
        answer()
        child = os.fork()
        if child == 0:
            os.sched_setaffinity(0, {os.cpu_count() - 1})
            answer()
            os._exit(0)
        os.waitpid(child, 0)
        answer()
        while conn.recv(4096):
            pass
        reader.close()
        conn.close()


def reap():
    try:
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass
    except ChildProcessError:
        pass


MODELS = {
    "prefork": prefork,
    "fork": fork,
    "scm": scm,
    "threads": threads,
    "exec": exec_cat,
    "pingpong": pingpong,
}


def main():
    model = MODELS[sys.argv[1]]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    say("listening", listener.getsockname()[1], os.getpid())
    model(listener)


if __name__ == "__main__":
    main()
