//! Windows named-pipe check, run by `cargo xtask windows-check` under wine (or on Windows).
//!
//! Plays the VM: creates named-pipe servers with tokio's `ServerOptions` and connects to them
//! through kdpilot's own `open()` / `open_waiting()` with kd-style `com:pipe,port=\\.\pipe\...`
//! strings. Checks bytes both ways, the `ERROR_PIPE_BUSY` retry, waiting for a pipe that
//! appears late (`reconnect`), the error for a missing pipe, and EOF after the server goes.
//! Prints one line per check and exits non-zero on the first failure.

#[cfg(windows)]
#[tokio::main]
async fn main() -> std::process::ExitCode {
    match tokio::time::timeout(std::time::Duration::from_secs(60), windows::run()).await {
        Ok(Ok(())) => {
            println!("pipe_echo: all checks passed");
            std::process::ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("pipe_echo: FAILED: {e}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("pipe_echo: FAILED: timed out after 60 s");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(not(windows))]
fn main() {
    eprintln!("pipe_echo checks Windows named pipes: run it on Windows, or `cargo xtask windows-check` (wine)");
}

#[cfg(windows)]
mod windows {
    use std::error::Error;
    use std::time::{Duration, Instant};

    use kdpilot_transport::{
        is_link_lost, open, open_waiting, Endpoint, LinkKind, TransportError, WaitOptions,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::windows::named_pipe::{NamedPipeServer, ServerOptions};

    type Result<T = ()> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

    fn pipe_name(suffix: &str) -> String {
        format!(r"\\.\pipe\kdpilot-test-{}-{suffix}", std::process::id())
    }

    fn endpoint(s: &str) -> Result<Endpoint> {
        Ok(s.parse()?)
    }

    fn check(ok: bool, what: &str) -> Result {
        if ok {
            Ok(())
        } else {
            Err(what.into())
        }
    }

    /// Plays the target: greets, then echoes what it reads, uppercased.
    async fn serve(mut server: NamedPipeServer) -> Result {
        server.connect().await?;
        server.write_all(b"target says hi").await?;
        let mut buf = [0u8; 64];
        loop {
            let n = server.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            server.write_all(&buf[..n].to_ascii_uppercase()).await?;
        }
    }

    async fn exchange(link: &mut kdpilot_transport::Link) -> Result {
        let mut greeting = [0u8; 14];
        link.read_exact(&mut greeting).await?;
        check(&greeting == b"target says hi", "greeting from the server")?;
        link.write_all(b"host says hello").await?;
        let mut echo = [0u8; 15];
        link.read_exact(&mut echo).await?;
        check(&echo == b"HOST SAYS HELLO", "echo from the server")
    }

    pub async fn run() -> Result {
        // 1. Bytes both ways through open() with kd's connection string.
        let name = pipe_name("basic");
        let server = ServerOptions::new()
            .first_pipe_instance(true)
            .create(&name)?;
        let task = tokio::spawn(serve(server));
        let ep = endpoint(&format!("com:pipe,port={name},resets=0"))?;
        let mut link = open(&ep).await?;
        check(link.kind() == LinkKind::NamedPipe, "link kind is NamedPipe")?;
        exchange(&mut link).await?;
        drop(link);
        task.await??;
        println!("ok   bytes both ways over {name}");

        // 2. ERROR_PIPE_BUSY: the only instance is taken; a second one appears 300 ms later.
        let name = pipe_name("busy");
        let first = ServerOptions::new()
            .first_pipe_instance(true)
            .create(&name)?;
        let first_task = tokio::spawn(serve(first));
        let ep = endpoint(&format!("com:pipe,port={name}"))?;
        let mut holder = open(&ep).await?;
        exchange(&mut holder).await?;
        let late_name = name.clone();
        let second_task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            serve(ServerOptions::new().create(&late_name)?).await
        });
        let started = Instant::now();
        let mut second = open(&ep).await?;
        let waited = started.elapsed();
        check(
            waited >= Duration::from_millis(250),
            "second client should have waited for the busy pipe",
        )?;
        exchange(&mut second).await?;
        println!(
            "ok   ERROR_PIPE_BUSY retried: second client connected after {} ms",
            waited.as_millis()
        );
        drop((holder, second));
        first_task.await??;
        second_task.await??;

        // 3. Busy for longer than the retry budget: a clear Busy error.
        let name = pipe_name("busy-long");
        let only = ServerOptions::new()
            .first_pipe_instance(true)
            .create(&name)?;
        let only_task = tokio::spawn(serve(only));
        let ep = endpoint(&format!("com:pipe,port={name}"))?;
        let mut holder = open(&ep).await?;
        exchange(&mut holder).await?;
        let err = open(&ep).await.expect_err("pipe stays busy");
        check(
            matches!(err, TransportError::Busy { .. }) && err.is_transient(),
            "Busy error after the retry budget",
        )?;
        println!("ok   busy pipe reported: {err}");
        drop(holder);
        only_task.await??;

        // 4. Missing pipe without reconnect: NotFound, transient.
        let name = pipe_name("absent");
        let err = open(&endpoint(&format!("com:pipe,port={name}"))?)
            .await
            .expect_err("no such pipe");
        check(
            matches!(err, TransportError::NotFound { .. }) && err.is_transient(),
            "NotFound error for a missing pipe",
        )?;
        println!("ok   missing pipe reported: {err}");

        // 5. reconnect: wait for a pipe that appears 500 ms later.
        let name = pipe_name("late");
        let late_name = name.clone();
        let late_task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let server = ServerOptions::new()
                .first_pipe_instance(true)
                .create(&late_name)?;
            serve(server).await
        });
        let ep = endpoint(&format!(r"com:pipe,port={name},resets=0,reconnect"))?;
        let options = WaitOptions {
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            give_up_after: Some(Duration::from_secs(20)),
        };
        let mut events = Vec::new();
        let started = Instant::now();
        let mut link = open_waiting(&ep, &options, |event| events.push(event.to_string())).await?;
        let waited = started.elapsed();
        exchange(&mut link).await?;
        check(!events.is_empty(), "wait events reported")?;
        check(
            events[0] == format!("waiting for named pipe {name} to appear"),
            "first wait event text",
        )?;
        println!(
            "ok   reconnect waited {} ms ({} wait events, first: \"{}\")",
            waited.as_millis(),
            events.len(),
            events[0]
        );

        // 6. The server goes away: the client sees EOF or a link-lost error.
        late_task.abort();
        let _ = late_task.await;
        let mut byte = [0u8; 1];
        match link.read(&mut byte).await {
            Ok(0) => println!("ok   server gone: EOF"),
            Err(e) if is_link_lost(&e) => println!("ok   server gone: link lost ({e})"),
            other => {
                return Err(format!("expected EOF after the server went, got {other:?}").into())
            }
        }
        Ok(())
    }
}
